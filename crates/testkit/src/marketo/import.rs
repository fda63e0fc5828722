//! The import model of the Marketo stand-in, apart from HTTP: how an
//! uploaded CSV is read (lookup column, duplicates, scripted failure and
//! warning rows, the normalised echo Marketo writes to result files) and
//! how queued imports move to importing and complete as they are polled.

use super::{Import, ImportInfo, Inner, RowRule, Shared};

/// Imports queued or importing: what counts against `max_queued`.
pub(super) fn active_imports(inner: &Inner) -> usize {
    inner
        .imports
        .values()
        .filter(|i| i.info.status == "Queued" || i.info.status == "Importing")
        .count()
}

/// An uploaded file as Marketo sees it: counts, result rows, and the
/// accepted lookup values still to be counted as imported.
pub(super) struct Parsed {
    pub(super) info: ImportInfo,
    pub(super) failures: Vec<Vec<String>>,
    pub(super) warnings: Vec<Vec<String>>,
    pub(super) pending_keys: Vec<String>,
    pub(super) accepted_rows: u64,
}

/// Parses an import file; rows matching a fail or warn rule go to the
/// result files with the rule's reason.
pub(super) fn parse_file(
    file: &[u8],
    lookup: &str,
    fail_rules: &[RowRule],
    warn_rules: &[RowRule],
    track: bool,
) -> Result<Parsed, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let columns: Vec<String> = reader
        .headers()
        .map_err(|e| format!("Invalid file: {e}"))?
        .iter()
        .map(String::from)
        .collect();
    let key_col = columns
        .iter()
        .position(|c| c.eq_ignore_ascii_case(lookup))
        .ok_or_else(|| format!("Lookup field '{lookup}' not found in file header"))?;
    let email_col = columns.iter().position(|c| c.eq_ignore_ascii_case("email"));
    let mut seen = std::collections::HashSet::new();
    let mut out = Parsed {
        info: ImportInfo {
            batch_id: 0,
            status: String::new(),
            rows: 0,
            columns: columns.clone(),
            lookup_field: String::new(),
            list_id: None,
            partition_name: None,
            file_bytes: file.len(),
            duplicate_keys: 0,
            failed_rows: 0,
            warning_rows: 0,
        },
        failures: Vec::new(),
        warnings: Vec::new(),
        pending_keys: Vec::new(),
        accepted_rows: 0,
    };
    for record in reader.records() {
        let record = record.map_err(|e| format!("Invalid file: {e}"))?;
        out.info.rows += 1;
        let key = record.get(key_col).unwrap_or("").trim().to_lowercase();
        if !seen.insert(key.clone()) {
            out.info.duplicate_keys += 1;
        }
        // Marketo normalises what it echoes: trimmed, lower-cased lookup values and emails.
        let echo = || -> Vec<String> {
            record
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if i == key_col || Some(i) == email_col {
                        v.trim().to_lowercase()
                    } else {
                        v.to_string()
                    }
                })
                .collect()
        };
        if let Some(rule) = fail_rules.iter().find(|r| key.contains(&r.pattern)) {
            let mut row = echo();
            row.push(rule.reason.clone());
            out.failures.push(row);
            out.info.failed_rows += 1;
            continue;
        }
        if let Some(rule) = warn_rules.iter().find(|r| key.contains(&r.pattern)) {
            let mut row = echo();
            row.push(rule.reason.clone());
            out.warnings.push(row);
            out.info.warning_rows += 1;
        }
        out.accepted_rows += 1;
        if track {
            out.pending_keys.push(key);
        }
    }
    Ok(out)
}

/// Marks an import complete and counts its accepted rows as imported.
pub(super) fn complete(inner: &mut Inner, imp: &mut Import) {
    imp.info.status = "Complete".into();
    imp.processed = imp.info.rows;
    inner.rows_imported += imp.accepted_rows;
    for key in std::mem::take(&mut imp.pending_keys) {
        *inner.imported.entry(key).or_insert(0) += 1;
    }
}

/// One poll's worth of progress: FIFO promotion into the importing slots,
/// then the polled import advances if it is importing.
pub(super) fn advance(shared: &Shared, inner: &mut Inner, batch_id: u64) {
    let promote = |inner: &mut Inner| {
        let mut importing = inner
            .imports
            .values()
            .filter(|i| i.info.status == "Importing")
            .count();
        for imp in inner.imports.values_mut() {
            if importing >= shared.opts.max_importing {
                break;
            }
            if imp.info.status == "Queued" {
                imp.info.status = "Importing".into();
                importing += 1;
            }
        }
    };
    promote(inner);
    let Some(mut imp) = inner.imports.remove(&batch_id) else {
        return;
    };
    if imp.info.status == "Importing" {
        imp.polls += 1;
        let needed = shared.opts.polls_to_complete.max(1);
        if imp.polls >= needed {
            complete(inner, &mut imp);
        } else {
            imp.processed = imp.info.rows * u64::from(imp.polls) / u64::from(needed);
        }
    }
    inner.imports.insert(batch_id, imp);
    promote(inner);
}
