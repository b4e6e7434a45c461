//! Model allow-lists (SPEC §12): what an org or a token may call, as names or `*`-prefixes,
//! matched ASCII-case-insensitively after trimming. Shared by authd (which normalises and stores
//! them) and the proxy (which checks the name the client sent and the target after alias
//! resolution against both lists). An empty list allows every model.

/// Most entries in one list.
pub const MAX_ENTRIES: usize = 64;
/// Longest entry.
pub const MAX_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelListError {
    #[error("a model allow-list holds at most {MAX_ENTRIES} entries")]
    TooMany,
    #[error("a model allow-list entry must be 1-{MAX_LEN} visible ASCII characters, with \"*\" only at its end")]
    BadEntry,
}

/// Trims, lowercases, checks and de-duplicates a list (order kept).
pub fn normalize<S: AsRef<str>>(list: &[S]) -> Result<Vec<String>, ModelListError> {
    if list.len() > MAX_ENTRIES {
        return Err(ModelListError::TooMany);
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for e in list {
        let e = e.as_ref().trim().to_ascii_lowercase();
        let body = e.strip_suffix('*').unwrap_or(&e);
        if e.is_empty()
            || e.len() > MAX_LEN
            || body.contains('*')
            || !e.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ModelListError::BadEntry);
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Whether one normalised entry matches `model` (trimmed, ASCII-case-insensitive).
fn entry_matches(entry: &str, model: &str) -> bool {
    let model = model.trim().as_bytes();
    match entry.strip_suffix('*') {
        Some(prefix) => {
            model.len() >= prefix.len()
                && model[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        }
        None => model.eq_ignore_ascii_case(entry.as_bytes()),
    }
}

/// Whether a normalised `list` allows `model`; the empty list allows everything.
pub fn allows<S: AsRef<str>>(list: &[S], model: &str) -> bool {
    list.is_empty() || list.iter().any(|e| entry_matches(e.as_ref(), model))
}

/// Whether everything `inner` allows is allowed by `outer` (both normalised): a token made with
/// a PAT never reaches a model the PAT could not.
pub fn covers<S: AsRef<str>, T: AsRef<str>>(outer: &[S], inner: &[T]) -> bool {
    if outer.is_empty() {
        return true;
    }
    !inner.is_empty()
        && inner.iter().all(|i| {
            let i = i.as_ref();
            outer.iter().any(|o| {
                let o = o.as_ref();
                match (o.strip_suffix('*'), i.strip_suffix('*')) {
                    (Some(op), Some(ip)) => ip.starts_with(op),
                    (Some(op), None) => i.starts_with(op),
                    (None, Some(_)) => false,
                    (None, None) => o == i,
                }
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_bad_entries() {
        assert_eq!(
            normalize(&[" GPT-4o ", "claude-*", "gpt-4o"]).unwrap(),
            vec!["gpt-4o".to_owned(), "claude-*".to_owned()]
        );
        for bad in ["", "  ", "a*b", "**", "a b", "x\u{e9}"] {
            assert_eq!(normalize(&[bad]), Err(ModelListError::BadEntry), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("m{i}")).collect();
        assert_eq!(normalize(&many), Err(ModelListError::TooMany));
    }

    #[test]
    fn matches_case_and_whitespace_variants_and_prefixes() {
        let list = normalize(&["gpt-4o-mini", "claude-*"]).unwrap();
        for ok in [
            "gpt-4o-mini",
            "GPT-4O-MINI",
            " gpt-4o-mini\t",
            "claude-3",
            "Claude-X",
        ] {
            assert!(allows(&list, ok), "{ok:?}");
        }
        for no in [
            "gpt-4o",
            "gpt-4o-mini-2",
            "gpt-4o-min",
            "claude",
            "",
            "x-claude-3",
        ] {
            assert!(!allows(&list, no), "{no:?}");
        }
        assert!(allows::<&str>(&[], "anything"));
    }

    #[test]
    fn coverage() {
        let outer = normalize(&["gpt-*", "claude-3"]).unwrap();
        assert!(covers(
            &outer,
            &normalize(&["gpt-4o", "gpt-4*", "claude-3"]).unwrap()
        ));
        assert!(!covers(&outer, &normalize(&["claude-*"]).unwrap()));
        assert!(
            !covers(&outer, &Vec::<String>::new()),
            "every model is more than the list"
        );
        assert!(covers(&Vec::<String>::new(), &Vec::<String>::new()));
    }
}
