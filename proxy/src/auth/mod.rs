//! Token and agent caches, the authd bridge and the invalidation feed.
