//! Remote file names from the `filePath` template: macros expanded in UTC
//! from the batch's creation time, unknown macros refused at build.

use batchrouter_core::destination::did_you_mean;
use batchrouter_core::Timestamp;
use chrono::{DateTime, Datelike, Timelike, Utc};

/// Every macro a `filePath` may use.
pub const MACROS: &[&str] = &[
    "YYYY",
    "MM",
    "DD",
    "hh",
    "mm",
    "ss",
    "ms",
    "timestampInSec",
    "timestampInMS",
    "destinationID",
    "jobRunID",
    "batchID",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Macro {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millis,
    TimestampSec,
    TimestampMs,
    DestinationId,
    JobRunId,
    BatchId,
}

impl Macro {
    fn from_name(name: &str) -> Option<Macro> {
        Some(match name {
            "YYYY" => Macro::Year,
            "MM" => Macro::Month,
            "DD" => Macro::Day,
            "hh" => Macro::Hour,
            "mm" => Macro::Minute,
            "ss" => Macro::Second,
            "ms" => Macro::Millis,
            "timestampInSec" => Macro::TimestampSec,
            "timestampInMS" => Macro::TimestampMs,
            "destinationID" => Macro::DestinationId,
            "jobRunID" => Macro::JobRunId,
            "batchID" => Macro::BatchId,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Macro(Macro),
}

/// A parsed `filePath` template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    source: String,
    parts: Vec<Part>,
    /// The template names the batch itself (`{batchID}` or `{jobRunID}`);
    /// otherwise `_<batchID>` is added before the extension so two batches
    /// never share a file.
    names_batch: bool,
}

impl PathTemplate {
    /// Parses a template, listing every problem (unknown macros with
    /// suggestions, unbalanced braces, a path that names no file).
    pub fn parse(template: &str) -> Result<PathTemplate, Vec<String>> {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            if rest[i..].starts_with('}') {
                problems.push(format!("`filePath` has an unmatched `}}` in `{template}`"));
                rest = &rest[i + 1..];
                continue;
            }
            let after = &rest[i + 1..];
            let Some(close) = after.find('}') else {
                problems.push(format!("`filePath` has an unclosed `{{` in `{template}`"));
                rest = "";
                break;
            };
            let name = &after[..close];
            if name.contains('{') {
                problems.push(format!("`filePath` has an unclosed `{{` in `{template}`"));
                rest = &after[close + 1..];
                continue;
            }
            match Macro::from_name(name) {
                Some(m) => {
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Macro(m));
                }
                None => {
                    let hint = did_you_mean(name, MACROS)
                        .map(|s| format!(" (did you mean `{{{s}}}`?)"))
                        .unwrap_or_else(|| {
                            let known: Vec<String> =
                                MACROS.iter().map(|m| format!("{{{m}}}")).collect();
                            format!(" (known macros: {})", known.join(" "))
                        });
                    problems.push(format!("`filePath` uses unknown macro `{{{name}}}`{hint}"));
                }
            }
            rest = &after[close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if template.trim().is_empty() {
            problems.push("`filePath` is empty".into());
        } else if template.ends_with('/') {
            problems.push(format!(
                "`filePath` `{template}` ends with `/`: it must name a file"
            ));
        }
        if template.contains('\0') {
            problems.push("`filePath` contains a NUL character".into());
        }
        if template.ends_with(".part") {
            problems.push(
                "`filePath` must not end with `.part` (that suffix marks uploads in progress)"
                    .into(),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let names_batch = parts.iter().any(|p| {
            matches!(
                p,
                Part::Macro(Macro::BatchId) | Part::Macro(Macro::JobRunId)
            )
        });
        Ok(PathTemplate {
            source: template.to_string(),
            parts,
            names_batch,
        })
    }

    /// The template as configured.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template itself names the batch (else `_<batchID>` is added).
    pub fn names_batch(&self) -> bool {
        self.names_batch
    }

    /// The remote path for one batch. Dates are UTC from `created_at`;
    /// `{jobRunID}` is the batch id (batchrouter has no job runs); ids are
    /// reduced to `[A-Za-z0-9._-]` so they cannot add directories.
    pub fn expand(&self, destination_id: &str, batch_id: &str, created_at: Timestamp) -> String {
        let ms = created_at.as_millis();
        let t: DateTime<Utc> = DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let batch = safe_component(batch_id);
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Macro(m) => match m {
                    Macro::Year => out.push_str(&format!("{:04}", t.year())),
                    Macro::Month => out.push_str(&format!("{:02}", t.month())),
                    Macro::Day => out.push_str(&format!("{:02}", t.day())),
                    Macro::Hour => out.push_str(&format!("{:02}", t.hour())),
                    Macro::Minute => out.push_str(&format!("{:02}", t.minute())),
                    Macro::Second => out.push_str(&format!("{:02}", t.second())),
                    Macro::Millis => out.push_str(&format!("{:03}", ms.rem_euclid(1000))),
                    Macro::TimestampSec => out.push_str(&ms.div_euclid(1000).to_string()),
                    Macro::TimestampMs => out.push_str(&ms.to_string()),
                    Macro::DestinationId => out.push_str(&safe_component(destination_id)),
                    Macro::JobRunId | Macro::BatchId => out.push_str(&batch),
                },
            }
        }
        if !self.names_batch {
            insert_before_extension(&mut out, &format!("_{batch}"));
        }
        out
    }
}

/// Inserts `suffix` before the file name's extension (or at its end).
fn insert_before_extension(path: &mut String, suffix: &str) {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[name_start..].rfind('.') {
        Some(dot) if dot > 0 => path.insert_str(name_start + dot, suffix),
        _ => path.push_str(suffix),
    }
}

/// Keeps an id safe inside one path component.
fn safe_component(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with('.') {
        s.replace_range(..1, "_");
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

/// The directory part of a remote path (`""` when there is none).
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29T23:59:58.007Z
    const T: Timestamp = Timestamp(1_709_251_198_007);

    #[test]
    fn every_macro_expands_in_utc() {
        let t = PathTemplate::parse(
            "out/{YYYY}/{MM}/{DD}/{hh}-{mm}-{ss}.{ms}_{timestampInSec}_{timestampInMS}_{destinationID}_{jobRunID}_{batchID}.csv",
        )
        .unwrap();
        assert_eq!(
            t.expand("dest-1", "b42", T),
            "out/2024/02/29/23-59-58.007_1709251198_1709251198007_dest-1_b42_b42.csv"
        );
    }

    #[test]
    fn templates_without_the_batch_get_it_before_the_extension() {
        let t = PathTemplate::parse("exports/{YYYY}-{MM}-{DD}.csv").unwrap();
        assert!(!t.names_batch());
        assert_eq!(t.expand("d", "b1", T), "exports/2024-02-29_b1.csv");
        let t = PathTemplate::parse("exports.d/data").unwrap();
        assert_eq!(t.expand("d", "b1", T), "exports.d/data_b1");
        let t = PathTemplate::parse(".hidden").unwrap();
        assert_eq!(t.expand("d", "b1", T), ".hidden_b1");
        let t = PathTemplate::parse("/srv/{jobRunID}/data.json").unwrap();
        assert_eq!(t.expand("d", "b1", T), "/srv/b1/data.json");
    }

    #[test]
    fn ids_cannot_escape_their_component() {
        let t = PathTemplate::parse("x/{destinationID}/{batchID}.csv").unwrap();
        assert_eq!(t.expand("../etc", "a/b c", T), "x/_._etc/a_b_c.csv");
    }

    #[test]
    fn problems_are_all_listed() {
        let err = PathTemplate::parse("{yyyy}/{nope}/x}/{MM").unwrap_err();
        assert_eq!(err.len(), 4, "{err:?}");
        assert!(
            err[0].contains("unknown macro `{yyyy}` (did you mean `{YYYY}`?)"),
            "{err:?}"
        );
        assert!(
            err[1].contains("unknown macro `{nope}` (known macros: {YYYY}"),
            "{err:?}"
        );
        assert!(err[2].contains("unmatched `}`"), "{err:?}");
        assert!(err[3].contains("unclosed `{`"), "{err:?}");
        assert!(PathTemplate::parse("dir/").unwrap_err()[0].contains("must name a file"));
        assert!(PathTemplate::parse("x.part").unwrap_err()[0].contains(".part"));
        assert!(PathTemplate::parse("a{b{MM}").unwrap_err()[0].contains("unclosed"));
    }

    #[test]
    fn negative_and_epoch_times_do_not_panic() {
        let t = PathTemplate::parse("{YYYY}{ms}{timestampInSec}/{batchID}").unwrap();
        assert_eq!(t.expand("d", "b", Timestamp(0)), "19700000/b");
        assert_eq!(t.expand("d", "b", Timestamp(-1)), "1969999-1/b");
    }

    #[test]
    fn parents() {
        assert_eq!(parent("a/b/c.csv"), "a/b");
        assert_eq!(parent("/c.csv"), "/");
        assert_eq!(parent("c.csv"), "");
    }
}
