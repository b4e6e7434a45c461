//! The route table: which templates exist, which method each takes, which
//! permission bit it needs and which are public. Pure and at the bottom of
//! the crate (it imports only the codec's [`Method`] and the shared
//! permission bits); what each route answers is in [`crate::chain::handlers`].
//!
//! Deny by default: only the templates in [`PUBLIC`] skip authentication.
//! Every other path — known, unknown, or outside `/v1` — is protected, so an
//! anonymous caller gets 401 before it can learn whether a route exists
//! (SPEC §3: 404 and 405 only after auth).

use ibex_proto::perms;

use crate::http::{Listener, Method};

/// Every route template, for metrics and logs. `Unmatched` covers unknown
/// paths (and refusals before the route was decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Health,
    Ready,
    Metrics,
    InternalProbe,
    OrgProbe,
    Models,
    Chat,
    Completions,
    Responses,
    Embeddings,
    Messages,
    Unmatched,
}

impl RouteId {
    pub const COUNT: usize = 12;
    pub const ALL: [RouteId; Self::COUNT] = [
        RouteId::Health,
        RouteId::Ready,
        RouteId::Metrics,
        RouteId::InternalProbe,
        RouteId::OrgProbe,
        RouteId::Models,
        RouteId::Chat,
        RouteId::Completions,
        RouteId::Responses,
        RouteId::Embeddings,
        RouteId::Messages,
        RouteId::Unmatched,
    ];

    pub fn template(self) -> &'static str {
        match self {
            RouteId::Health => "/health",
            RouteId::Ready => "/ready",
            RouteId::Metrics => "/metrics",
            RouteId::InternalProbe => "/v1/internal/auth-probe",
            RouteId::OrgProbe => "/v1/orgs/{org_id}/auth-probe",
            RouteId::Models => "/v1/models",
            RouteId::Chat => "/v1/chat/completions",
            RouteId::Completions => "/v1/completions",
            RouteId::Responses => "/v1/responses",
            RouteId::Embeddings => "/v1/embeddings",
            RouteId::Messages => "/v1/messages",
            RouteId::Unmatched => "unmatched",
        }
    }

    fn method(self) -> Method {
        match self {
            RouteId::Chat
            | RouteId::Completions
            | RouteId::Responses
            | RouteId::Embeddings
            | RouteId::Messages => Method::Post,
            _ => Method::Get,
        }
    }

    /// The permission bit a protected route needs (SPEC §2).
    pub fn permission(self) -> u64 {
        match self {
            RouteId::Chat | RouteId::Completions | RouteId::Responses | RouteId::Messages => {
                perms::CHAT
            }
            RouteId::Embeddings => perms::EMBEDDINGS,
            _ => perms::READ,
        }
    }
}

/// Routes answered without credentials on the public listener. `/metrics`
/// is not one of them: its labels carry org ids, so it is served only on the
/// admin listener and is an unknown route here (SPEC §3).
const PUBLIC: [RouteId; 2] = [RouteId::Health, RouteId::Ready];
/// The only routes of the admin listener, all without credentials (it is
/// the operator's, on loopback by default).
const ADMIN: [RouteId; 3] = [RouteId::Health, RouteId::Ready, RouteId::Metrics];

/// What the table says about a request, before anything is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// A public route with the right method: answer it now.
    Public(RouteId),
    /// A public path with the wrong method: 405 now (nothing to hide).
    PublicWrongMethod(RouteId),
    /// Everything else goes through auth first; `Err` is the answer the
    /// caller gets only once authenticated (404 or 405).
    Protected(Result<RouteId, (RouteId, RouteError)>),
    /// On the admin listener, anything but its own routes: 404 at once.
    NotServed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed,
}

impl Matched {
    /// The template to log and count this request under.
    pub fn id(self) -> RouteId {
        match self {
            Matched::Public(r) | Matched::PublicWrongMethod(r) => r,
            Matched::Protected(Ok(r)) | Matched::Protected(Err((r, _))) => r,
            Matched::NotServed => RouteId::Unmatched,
        }
    }
}

/// Matches a path (no query string) and method against the table of the
/// listener the request came in on.
pub fn match_route(listener: Listener, method: Method, path: &[u8]) -> Matched {
    let route = path_route(path);
    if listener == Listener::Admin {
        return match route {
            Some(r) if ADMIN.contains(&r) && method == r.method() => Matched::Public(r),
            Some(r) if ADMIN.contains(&r) => Matched::PublicWrongMethod(r),
            _ => Matched::NotServed,
        };
    }
    let Some(route) = route.filter(|r| *r != RouteId::Metrics) else {
        return Matched::Protected(Err((RouteId::Unmatched, RouteError::NotFound)));
    };
    let method_ok = method == route.method();
    match (PUBLIC.contains(&route), method_ok) {
        (true, true) => Matched::Public(route),
        (true, false) => Matched::PublicWrongMethod(route),
        (false, true) => Matched::Protected(Ok(route)),
        (false, false) => Matched::Protected(Err((route, RouteError::MethodNotAllowed))),
    }
}

fn path_route(path: &[u8]) -> Option<RouteId> {
    Some(match path {
        b"/health" => RouteId::Health,
        b"/ready" => RouteId::Ready,
        b"/metrics" => RouteId::Metrics,
        b"/v1/internal/auth-probe" => RouteId::InternalProbe,
        b"/v1/models" => RouteId::Models,
        b"/v1/chat/completions" => RouteId::Chat,
        b"/v1/completions" => RouteId::Completions,
        b"/v1/responses" => RouteId::Responses,
        b"/v1/embeddings" => RouteId::Embeddings,
        b"/v1/messages" => RouteId::Messages,
        _ => {
            let org = path
                .strip_prefix(b"/v1/orgs/")?
                .strip_suffix(b"/auth-probe")?;
            if org.contains(&b'/') {
                return None;
            }
            RouteId::OrgProbe
        }
    })
}

/// The `{org_id}` segment of an org-probe path.
pub fn org_segment(path: &[u8]) -> &[u8] {
    path.strip_prefix(b"/v1/orgs/")
        .and_then(|p| p.strip_suffix(b"/auth-probe"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_routes_are_the_allow_list() {
        assert_eq!(
            match_route(Listener::Public, Method::Get, b"/health"),
            Matched::Public(RouteId::Health)
        );
        assert_eq!(
            match_route(Listener::Public, Method::Get, b"/ready"),
            Matched::Public(RouteId::Ready)
        );
        assert_eq!(
            match_route(Listener::Public, Method::Get, b"/metrics"),
            Matched::Protected(Err((RouteId::Unmatched, RouteError::NotFound))),
            "/metrics is an unknown route on the public listener"
        );
        assert_eq!(
            match_route(Listener::Public, Method::Post, b"/health"),
            Matched::PublicWrongMethod(RouteId::Health)
        );
    }

    #[test]
    fn the_admin_listener_serves_only_its_own_routes() {
        for (path, route) in [
            (&b"/metrics"[..], RouteId::Metrics),
            (b"/health", RouteId::Health),
            (b"/ready", RouteId::Ready),
        ] {
            assert_eq!(
                match_route(Listener::Admin, Method::Get, path),
                Matched::Public(route)
            );
            assert_eq!(
                match_route(Listener::Admin, Method::Post, path),
                Matched::PublicWrongMethod(route)
            );
        }
        for path in [
            &b"/v1/internal/auth-probe"[..],
            b"/v1/chat/completions",
            b"/",
        ] {
            assert_eq!(
                match_route(Listener::Admin, Method::Get, path),
                Matched::NotServed
            );
        }
    }

    #[test]
    fn unknown_paths_are_protected_then_404() {
        for p in [
            &b"/v1/nope"[..],
            b"/",
            b"/admin",
            b"/health/",
            b"/HEALTH",
            b"/v1/internal/auth-probe/",
            b"/v1/orgs/a/b/auth-probe",
            b"/v1/models%2F",
        ] {
            assert_eq!(
                match_route(Listener::Public, Method::Get, p),
                Matched::Protected(Err((RouteId::Unmatched, RouteError::NotFound))),
                "{}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn known_protected_routes() {
        assert_eq!(
            match_route(Listener::Public, Method::Get, b"/v1/internal/auth-probe"),
            Matched::Protected(Ok(RouteId::InternalProbe))
        );
        assert_eq!(
            match_route(
                Listener::Public,
                Method::Get,
                b"/v1/orgs/anything/auth-probe"
            ),
            Matched::Protected(Ok(RouteId::OrgProbe))
        );
        assert_eq!(
            match_route(Listener::Public, Method::Post, b"/v1/chat/completions"),
            Matched::Protected(Ok(RouteId::Chat))
        );
        assert_eq!(
            match_route(Listener::Public, Method::Get, b"/v1/chat/completions"),
            Matched::Protected(Err((RouteId::Chat, RouteError::MethodNotAllowed)))
        );
        assert_eq!(
            match_route(Listener::Public, Method::Delete, b"/v1/models"),
            Matched::Protected(Err((RouteId::Models, RouteError::MethodNotAllowed)))
        );
        assert_eq!(RouteId::Chat.permission(), perms::CHAT);
        assert_eq!(RouteId::Embeddings.permission(), perms::EMBEDDINGS);
        for (path, route) in [
            (&b"/v1/completions"[..], RouteId::Completions),
            (b"/v1/responses", RouteId::Responses),
            (b"/v1/embeddings", RouteId::Embeddings),
            (b"/v1/messages", RouteId::Messages),
        ] {
            assert_eq!(
                match_route(Listener::Public, Method::Post, path),
                Matched::Protected(Ok(route))
            );
            assert_ne!(route.permission(), perms::READ);
        }
        assert_eq!(RouteId::Models.permission(), perms::READ);
        assert_eq!(org_segment(b"/v1/orgs/abc/auth-probe"), b"abc");
        assert_eq!(org_segment(b"/v1/orgs//auth-probe"), b"");
    }
}
