//! TOML text to JSON values, with every problem naming its key and line.
//!
//! The generic config loader turns an out-of-range integer into "number too
//! large to fit in target type" with no key and no line; a user with fifty
//! keys cannot tell which one is wrong. Here each such value is reported as
//! `BatchRouter.maxEventsInABatch (line 7): …` and left out, so the rest of
//! the file is still checked and every problem is listed at once.

use serde_json::{Map, Number, Value};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Parses TOML into a JSON value. Values that have no JSON/64-bit form are
/// left out and described in the returned problems; a syntax error is the
/// single `Err` problem, naming the key on the offending line when it can.
pub(crate) fn parse(text: &str) -> Result<(Value, Vec<String>), String> {
    let table = DeTable::parse(text).map_err(|e| {
        let at = e
            .span()
            .and_then(|span| key_at(text, span.start))
            .map(|key| format!("key `{key}`: "))
            .unwrap_or_default();
        format!("cannot parse config: {at}{e}")
    })?;
    let mut problems = Vec::new();
    let value = table_value(text, "", table.into_inner(), &mut problems);
    // Tables iterate in key order; report in the order of the file.
    problems.sort_by_key(|(line, _)| *line);
    Ok((value, problems.into_iter().map(|(_, p)| p).collect()))
}

fn table_value(
    text: &str,
    path: &str,
    table: DeTable<'_>,
    problems: &mut Vec<(usize, String)>,
) -> Value {
    let mut map = Map::new();
    for (key, value) in table {
        let key = key.into_inner().into_owned();
        let child = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if let Some(v) = value_of(text, &child, value, problems) {
            map.insert(key, v);
        }
    }
    Value::Object(map)
}

fn value_of(
    text: &str,
    path: &str,
    value: Spanned<DeValue<'_>>,
    problems: &mut Vec<(usize, String)>,
) -> Option<Value> {
    let line = line_of(text, value.span().start);
    let mut refuse = |why: String| {
        problems.push((line, format!("{path} (line {line}): {why}")));
        None
    };
    match value.into_inner() {
        DeValue::String(s) => Some(Value::String(s.into_owned())),
        DeValue::Boolean(b) => Some(Value::Bool(b)),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(Value::Number(n.into())),
            Err(_) => refuse(format!(
                "{i} is out of range for a number here (at most {})",
                i64::MAX
            )),
        },
        DeValue::Float(f) => match f.as_str().parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Some(Value::Number(n)),
            None => refuse(format!("{f} is not a finite number")),
        },
        DeValue::Datetime(d) => Some(Value::String(d.to_string())),
        DeValue::Array(items) => Some(Value::Array(
            items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| value_of(text, &format!("{path}[{i}]"), v, problems))
                .collect(),
        )),
        DeValue::Table(t) => Some(table_value(text, path, t, problems)),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key being assigned where a syntax error sits, from the
/// nearest `[table]` header above and the `key =` before the offset on its
/// line. `None` when the line is not a simple assignment.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let head = text.get(..offset)?;
    let line_start = head.rfind('\n').map_or(0, |i| i + 1);
    let before = &head[line_start..];
    let eq = before.rfind('=')?;
    let key_part = &before[..eq];
    let key_start = key_part.rfind(['{', ',']).map_or(0, |i| i + 1);
    let key = clean_key(&key_part[key_start..])?;
    let header = head[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|l| clean_key(l.trim_start_matches('[').split(']').next()?));
    let inline_parent = if key_start > 0 {
        // `x = { a = 1, b = … }`: name the inline table too.
        let outer = &key_part[..key_start];
        let brace = outer.rfind('{')?;
        outer[..brace]
            .trim_end()
            .strip_suffix('=')
            .and_then(|k| clean_key(&k[k.rfind(['{', ',']).map_or(0, |i| i + 1)..]))
    } else {
        None
    };
    Some(
        [header, inline_parent, Some(key)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// A bare or quoted dotted key without quotes and spaces, if it is one.
fn clean_key(raw: &str) -> Option<String> {
    let key: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, '"' | '\'' | ' '))
        .collect();
    let plausible = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
    plausible.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_numbers_name_their_key_and_line() {
        let text = "[BatchRouter]\nmaxRetries = 3\nmaxEventsInABatch = 99999999999999999999999\n\n[[destinations]]\nid = \"a\"\n[destinations.config]\nn = [1, 0x1ffffffffffffffff]\nf = inf\nok = 1.5\nwhen = 1979-05-27T07:32:00Z\n";
        let (value, problems) = parse(text).unwrap();
        assert_eq!(
            problems,
            vec![
                "BatchRouter.maxEventsInABatch (line 3): 99999999999999999999999 is out of range for a number here (at most 9223372036854775807)".to_string(),
                "destinations[0].config.n[1] (line 8): 0x1ffffffffffffffff is out of range for a number here (at most 9223372036854775807)".to_string(),
                "destinations[0].config.f (line 9): inf is not a finite number".to_string(),
            ]
        );
        assert_eq!(value["BatchRouter"]["maxRetries"], 3);
        assert!(value["BatchRouter"].get("maxEventsInABatch").is_none());
        assert_eq!(value["destinations"][0]["config"]["ok"], 1.5);
        assert_eq!(
            value["destinations"][0]["config"]["when"],
            "1979-05-27T07:32:00Z"
        );
        assert_eq!(
            value["destinations"][0]["config"]["n"],
            serde_json::json!([1])
        );
    }

    #[test]
    fn syntax_errors_name_the_key_on_their_line() {
        let err =
            parse("[server]\nlisten = \"x\"\n[BatchRouter.HTTP]\nuploadFreq = 5 s\n").unwrap_err();
        assert!(
            err.starts_with("cannot parse config: key `BatchRouter.HTTP.uploadFreq`: "),
            "{err}"
        );
        assert!(err.contains("line 4"), "{err}");
        let err = parse("[server]\nlimits = { a = 1, maxBodyBytes = 12x }\n").unwrap_err();
        assert!(
            err.starts_with("cannot parse config: key `server.limits.maxBodyBytes`: "),
            "{err}"
        );
        let err = parse("[unclosed\n").unwrap_err();
        assert!(
            err.starts_with("cannot parse config: TOML parse error"),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Whatever the file holds, reading it answers values or problems.
        #[test]
        fn never_panics(text in "(\\PC{0,12}[=\\[\\]{},\"'\n0-9]{0,3}){0,12}") {
            let _ = parse(&text);
            let _ = key_at(&text, text.len() / 2);
        }
    }
}
