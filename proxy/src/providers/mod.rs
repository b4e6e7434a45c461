//! Providers and routes (SPEC §12): which upstreams exist, and which of them serve a model.
//!
//! [`Table`] is what `IBEX_PROVIDERS_FILE` says (TOML), or, without the file, the single openai
//! provider of `IBEX_UPSTREAM_URL` serving every model. It is checked whole when read: a bad file
//! refuses to start, and on `SIGHUP` a bad file keeps the old table ([`ProviderBook::reload`]).
//! API keys are read from the environment variable each provider names, never from the file,
//! and never logged (they live in a [`SecretString`]).
//!
//! Not here: connections and forwarding ([`crate::upstream`]); the fallback loop
//! ([`crate::upstream::router`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use secrecy::SecretString;
use serde::Deserialize;

/// Most extra attempts a provider may be given on itself.
const MAX_RETRIES: u32 = 5;
/// Longest provider name (it goes into a header and the usage record).
const MAX_NAME: usize = 64;

/// The API shape a provider speaks. No translation between the two (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Openai,
    Anthropic,
}

/// One provider as configured.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: Kind,
    pub base_url: String,
    /// Read from the variable the file names; redacted in `Debug`.
    pub api_key: SecretString,
    /// Until the response headers.
    pub timeout: Duration,
    /// Extra attempts on this provider before the next one.
    pub retries: u32,
    /// `OpenAI-Organization` / `OpenAI-Project` sent to this provider: the file's
    /// `organization` / `project` keys of an `openai` provider (none when absent), or
    /// `IBEX_UPSTREAM_ORGANIZATION` / `IBEX_UPSTREAM_PROJECT` for the provider of
    /// `IBEX_UPSTREAM_URL`. The client's never pass (SPEC §3.1).
    pub operator: crate::upstream::request::OperatorHeaders,
}

/// One `[[route]]`: a model name (or `*`-prefix) and the providers tried for it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name without its trailing `*` when `prefix`.
    pub model: String,
    pub prefix: bool,
    /// The name sent upstream instead of the client's (an alias).
    pub target_model: Option<String>,
    /// Indexes into [`Table::providers`], all of one kind.
    pub providers: Vec<usize>,
    pub kind: Kind,
}

impl Route {
    fn matches(&self, model: &str) -> bool {
        if self.prefix {
            model.starts_with(&self.model)
        } else {
            model == self.model
        }
    }

    /// The model sent upstream for a client's `model`.
    pub fn target<'a>(&'a self, model: &'a str) -> &'a str {
        self.target_model.as_deref().unwrap_or(model)
    }

    /// How the route is written in the file (`gpt-*`, `fast`).
    pub fn pattern(&self) -> String {
        if self.prefix {
            format!("{}*", self.model)
        } else {
            self.model.clone()
        }
    }
}

/// Every provider and route, checked.
#[derive(Debug, Clone)]
pub struct Table {
    pub providers: Vec<ProviderSpec>,
    pub routes: Vec<Route>,
    /// Without a file: `/v1/models` is the upstream's own list, as before.
    pub legacy: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWire {
    #[serde(default)]
    provider: Vec<ProviderWire>,
    #[serde(default)]
    route: Vec<RouteWire>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderWire {
    name: String,
    kind: Kind,
    base_url: String,
    api_key_env: String,
    timeout: Option<String>,
    #[serde(default)]
    retries: u32,
    /// `OpenAI-Organization` for this provider (openai only).
    organization: Option<String>,
    /// `OpenAI-Project` for this provider (openai only).
    project: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteWire {
    model: String,
    target_model: Option<String>,
    providers: Vec<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Table {
    /// The single provider of `IBEX_UPSTREAM_URL`, named `default`, serving every model.
    pub fn legacy(provider: ProviderSpec) -> Self {
        Table {
            providers: vec![provider],
            routes: vec![Route {
                model: String::new(),
                prefix: true,
                target_model: None,
                providers: vec![0],
                kind: Kind::Openai,
            }],
            legacy: true,
        }
    }

    /// Parses and checks a providers file; `env` reads a key variable (the process
    /// environment in production). `defaults` gives the timeout of a provider without one.
    pub fn parse(
        text: &str,
        default_timeout: Duration,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let wire: FileWire = toml::from_str(text).context("not a valid providers file")?;
        ensure!(!wire.provider.is_empty(), "no [[provider]]");
        ensure!(!wire.route.is_empty(), "no [[route]]");
        let mut providers = Vec::with_capacity(wire.provider.len());
        for p in wire.provider {
            ensure!(
                valid_name(&p.name),
                "provider name {:?} must be 1-{MAX_NAME} visible ASCII characters",
                p.name
            );
            ensure!(
                !providers.iter().any(|q: &ProviderSpec| q.name == p.name),
                "provider {:?} is defined twice",
                p.name
            );
            crate::upstream::check_base_url(&p.base_url)
                .with_context(|| format!("provider {:?}: base_url", p.name))?;
            let key = env(&p.api_key_env)
                .filter(|k| !k.is_empty())
                .with_context(|| {
                    format!(
                        "provider {:?}: the variable {} named by api_key_env is unset or empty",
                        p.name, p.api_key_env
                    )
                })?;
            ensure!(
                key.bytes().all(|b| b.is_ascii_graphic()),
                "provider {:?}: the key in {} must be printable ASCII without spaces",
                p.name,
                p.api_key_env
            );
            let timeout = match &p.timeout {
                Some(t) => humantime::parse_duration(t)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| format!("provider {:?}: bad timeout {t:?}", p.name))?,
                None => default_timeout,
            };
            ensure!(
                p.retries <= MAX_RETRIES,
                "provider {:?}: retries must be at most {MAX_RETRIES}",
                p.name
            );
            for (field, value) in [("organization", &p.organization), ("project", &p.project)] {
                let Some(v) = value else { continue };
                ensure!(
                    p.kind == Kind::Openai,
                    "provider {:?}: {field} is for openai providers only",
                    p.name
                );
                ensure!(
                    !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| b.is_ascii_graphic()),
                    "provider {:?}: {field} must be 1-256 printable ASCII characters without spaces",
                    p.name
                );
            }
            providers.push(ProviderSpec {
                name: p.name,
                kind: p.kind,
                base_url: p.base_url,
                api_key: SecretString::from(key),
                timeout,
                retries: p.retries,
                operator: crate::upstream::request::OperatorHeaders {
                    organization: p.organization,
                    project: p.project,
                },
            });
        }
        let mut routes = Vec::with_capacity(wire.route.len());
        for r in wire.route {
            let (model, prefix) = match r.model.strip_suffix('*') {
                Some(m) => (m.to_owned(), true),
                None => (r.model.clone(), false),
            };
            ensure!(
                !model.contains('*') && (prefix || !model.is_empty()),
                "route {:?}: a model is an exact name or a prefix ending in one \"*\"",
                r.model
            );
            if let Some(t) = &r.target_model {
                ensure!(
                    !t.trim().is_empty() && !t.contains('*'),
                    "route {:?}: target_model must be a model name",
                    r.model
                );
            }
            ensure!(!r.providers.is_empty(), "route {:?}: no providers", r.model);
            let mut idx = Vec::with_capacity(r.providers.len());
            for name in &r.providers {
                let i = providers
                    .iter()
                    .position(|p| &p.name == name)
                    .with_context(|| format!("route {:?}: unknown provider {name:?}", r.model))?;
                ensure!(
                    !idx.contains(&i),
                    "route {:?}: provider {name:?} listed twice",
                    r.model
                );
                idx.push(i);
            }
            let kind = providers[idx[0]].kind;
            if idx.iter().any(|&i| providers[i].kind != kind) {
                bail!(
                    "route {:?}: its providers are of different kinds (openai and anthropic)",
                    r.model
                );
            }
            ensure!(
                !routes
                    .iter()
                    .any(|q: &Route| q.model == model && q.prefix == prefix),
                "route {:?} is defined twice",
                r.model
            );
            routes.push(Route {
                model,
                prefix,
                target_model: r.target_model.map(|t| t.trim().to_owned()),
                providers: idx,
                kind,
            });
        }
        Ok(Table {
            providers,
            routes,
            legacy: false,
        })
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path, default_timeout: Duration) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading IBEX_PROVIDERS_FILE {}", path.display()))?;
        for var in ["IBEX_UPSTREAM_ORGANIZATION", "IBEX_UPSTREAM_PROJECT"] {
            if std::env::var_os(var).is_some() {
                // With several providers there is no one account it could belong to.
                tracing::warn!(
                    variable = var,
                    "ignored with IBEX_PROVIDERS_FILE: set organization / project on each openai provider in the file"
                );
            }
        }
        Self::parse(&text, default_timeout, &|var| std::env::var(var).ok())
            .with_context(|| format!("IBEX_PROVIDERS_FILE {}", path.display()))
    }

    /// The route serving `model`: an exact route first, then the longest matching prefix.
    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| !r.prefix && r.matches(model))
            .or_else(|| {
                self.routes
                    .iter()
                    .filter(|r| r.prefix && r.matches(model))
                    .max_by_key(|r| r.model.len())
            })
    }
}

/// The process's table, swapped whole on reload. Workers compare [`ProviderBook::generation`]
/// (one relaxed load per request) and rebuild their connections only when it changed.
pub struct ProviderBook {
    generation: AtomicU64,
    current: RwLock<Arc<Table>>,
    path: Option<std::path::PathBuf>,
    default_timeout: Duration,
}

impl ProviderBook {
    pub fn new(table: Table, path: Option<std::path::PathBuf>, default_timeout: Duration) -> Self {
        ProviderBook {
            generation: AtomicU64::new(1),
            current: RwLock::new(Arc::new(table)),
            path,
            default_timeout,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> (u64, Arc<Table>) {
        let cur = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.generation(), cur.clone())
    }

    /// Re-reads the file (`SIGHUP`); on any error the old table stays and the error is returned.
    /// Returns the number of routes loaded.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let table = Table::load(path, self.default_timeout)?;
        let n = table.routes.len();
        self.replace(table);
        Ok(n)
    }

    pub fn replace(&self, table: Table) {
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cur = Arc::new(table);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const FILE: &str = r#"
[[provider]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "K_OPENAI"
timeout = "5s"
retries = 1

[[provider]]
name = "openai-eu"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "K_EU"

[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "K_ANT"

[[route]]
model = "fast"
target_model = "gpt-4o-mini"
providers = ["openai", "openai-eu"]

[[route]]
model = "gpt-*"
providers = ["openai"]

[[route]]
model = "gpt-4o-*"
providers = ["openai-eu"]

[[route]]
model = "claude-*"
providers = ["anthropic"]
"#;

    fn env(var: &str) -> Option<String> {
        match var {
            "K_OPENAI" => Some("sk-openai".into()),
            "K_EU" => Some("sk-eu".into()),
            "K_ANT" => Some("sk-ant".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> anyhow::Result<Table> {
        Table::parse(text, Duration::from_secs(60), &env)
    }

    #[test]
    fn parses_providers_routes_and_keys_from_the_environment() {
        let t = parse(FILE).unwrap();
        assert_eq!(t.providers.len(), 3);
        assert_eq!(t.providers[0].api_key.expose_secret(), "sk-openai");
        assert_eq!(t.providers[0].timeout, Duration::from_secs(5));
        assert_eq!(t.providers[0].retries, 1);
        assert_eq!(t.providers[1].timeout, Duration::from_secs(60));
        assert!(!format!("{:?}", t.providers[0]).contains("sk-openai"));
        let fast = t.route("fast").unwrap();
        assert_eq!(fast.target("fast"), "gpt-4o-mini");
        assert_eq!(fast.providers, vec![0, 1]);
        assert_eq!(t.route("gpt-4").unwrap().providers, vec![0]);
        // The longest prefix wins.
        assert_eq!(t.route("gpt-4o-mini").unwrap().providers, vec![1]);
        assert_eq!(t.route("claude-3").unwrap().kind, Kind::Anthropic);
        assert!(t.route("llama").is_none());
        assert!(t.route("FAST").is_none(), "routes match names exactly");
        assert_eq!(t.route("gpt-x").unwrap().target("gpt-x"), "gpt-x");
    }

    #[test]
    fn organization_and_project_are_per_openai_provider() {
        let file = FILE.replace(
            "timeout = \"5s\"\n",
            "timeout = \"5s\"\norganization = \"org-oa\"\nproject = \"proj-oa\"\n",
        );
        let t = parse(&file).unwrap();
        assert_eq!(
            t.providers[0].operator.organization.as_deref(),
            Some("org-oa")
        );
        assert_eq!(t.providers[0].operator.project.as_deref(), Some("proj-oa"));
        // A provider without them sends none (not the IBEX_UPSTREAM_* pair).
        assert_eq!(t.providers[1].operator, Default::default());
        assert_eq!(t.providers[2].operator, Default::default());
    }

    #[test]
    fn refuses_bad_files() {
        let provider = "[[provider]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"K_EU\"\n";
        let anth = "[[provider]]\nname = \"b\"\nkind = \"anthropic\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"K_ANT\"\n";
        for (bad, why) in [
            ("not toml [", "toml"),
            (provider, "no [[route]]"),
            (
                "[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n",
                "no [[provider]]",
            ),
            (
                &format!("{provider}[[route]]\nmodel = \"x\"\nproviders = [\"zz\"]\n"),
                "unknown provider",
            ),
            (
                &format!("{provider}[[route]]\nmodel = \"x\"\nproviders = []\n"),
                "no providers",
            ),
            (
                &format!("{provider}[[route]]\nmodel = \"a*b\"\nproviders = [\"a\"]\n"),
                "prefix",
            ),
            (
                &format!("{provider}[[route]]\nmodel = \"\"\nproviders = [\"a\"]\n"),
                "prefix",
            ),
            (
                &format!("{provider}{provider}[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n"),
                "twice",
            ),
            (
                &format!("{provider}{anth}[[route]]\nmodel = \"x\"\nproviders = [\"a\", \"b\"]\n"),
                "different kinds",
            ),
            (
                &format!("{provider}[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\nextra = 1\n"),
                "unknown field",
            ),
            (
                &format!(
                    "{}[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n",
                    provider.replace("K_EU", "K_MISSING")
                ),
                "unset",
            ),
            (
                &format!(
                    "{}[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n",
                    provider.replace("http://127.0.0.1:1/v1", "ftp://x")
                ),
                "base_url",
            ),
            (
                &format!(
                    "{}timeout = \"0s\"\n[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n",
                    provider
                ),
                "timeout",
            ),
            (
                &format!(
                    "{}retries = 9\n[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n",
                    provider
                ),
                "retries",
            ),
            (
                &format!(
                    "{}kind = \"azure\"\n",
                    provider.replace("kind = \"openai\"\n", "")
                ),
                "kind",
            ),
            (
                &format!("{anth}organization = \"org-1\"\n[[route]]\nmodel = \"x\"\nproviders = [\"b\"]\n"),
                "openai providers only",
            ),
            (
                &format!("{provider}project = \"p 1\"\n[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n"),
                "project must be",
            ),
            (
                &format!("{provider}organization = \"\"\n[[route]]\nmodel = \"x\"\nproviders = [\"a\"]\n"),
                "organization must be",
            ),
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(
                err.to_lowercase().contains(&why.to_lowercase()) || why == "toml" || why == "kind",
                "{why}: {err}"
            );
            assert!(!err.contains("sk-"), "a key leaked into {err}");
        }
    }

    #[test]
    fn a_reload_with_a_bad_file_keeps_the_old_table() {
        let dir = std::env::temp_dir().join(format!("ibex-prov-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("providers.toml");
        std::fs::write(&path, FILE.replace("K_", "IBEX_TEST_PROVIDERS_K_")).unwrap();
        for v in [
            "IBEX_TEST_PROVIDERS_K_OPENAI",
            "IBEX_TEST_PROVIDERS_K_EU",
            "IBEX_TEST_PROVIDERS_K_ANT",
        ] {
            std::env::set_var(v, "sk-test");
        }
        let table = Table::load(&path, Duration::from_secs(1)).unwrap();
        let book = ProviderBook::new(table, Some(path.clone()), Duration::from_secs(1));
        let g = book.generation();
        std::fs::write(&path, "garbage [").unwrap();
        assert!(book.reload().is_err());
        assert_eq!(book.generation(), g);
        assert_eq!(book.current().1.routes.len(), 4);
        std::fs::write(
            &path,
            FILE.replace("K_", "IBEX_TEST_PROVIDERS_K_")
                .replace("model = \"fast\"", "model = \"quick\""),
        )
        .unwrap();
        assert_eq!(book.reload().unwrap(), 4);
        assert!(book.generation() > g);
        assert!(book.current().1.route("quick").is_some());
        std::fs::remove_dir_all(&dir).ok();
    }
}
