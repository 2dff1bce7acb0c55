//! The JSON paths a policy's `approval.show` names: `$.` then member names joined by `.`
//! (`$.amount`, `$.payee.iban`), nothing else. Enough to pick the fields an approver must
//! see, without a query language that could match more than the operator meant.

use serde_json::Value;

/// The member names of a path, or why it is not one.
pub fn parse(path: &str) -> Result<Vec<&str>, &'static str> {
    let rest = path
        .strip_prefix("$.")
        .ok_or("a path starts with `$.`, e.g. `$.amount`")?;
    let names: Vec<&str> = rest.split('.').collect();
    let valid = |name: &&str| {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if names.len() > 8 || !names.iter().all(valid) {
        return Err("members are letters, digits, `_` or `-`, joined by `.` (at most 8)");
    }
    Ok(names)
}

/// The value at `path` in `document`, if there is one (a path that does not parse finds
/// nothing).
pub fn select<'a>(document: &'a Value, path: &str) -> Option<&'a Value> {
    parse(path)
        .ok()?
        .into_iter()
        .try_fold(document, |value, name| value.get(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_pick_members_only() {
        let doc = serde_json::json!({"amount": 120, "payee": {"iban": "DE89"}, "list": [1]});
        assert_eq!(select(&doc, "$.amount"), Some(&serde_json::json!(120)));
        assert_eq!(
            select(&doc, "$.payee.iban"),
            Some(&serde_json::json!("DE89"))
        );
        assert_eq!(select(&doc, "$.missing"), None);
        for bad in ["amount", "$", "$.", "$..a", "$.a[0]", "$.*", "$.a b"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
