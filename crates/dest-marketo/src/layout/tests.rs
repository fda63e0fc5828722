//! Tests of the whole planner, through [`plan_import_files`]: what the files
//! hold, their sizes, their order, and the jobs decided on the way.

use std::collections::{HashMap, HashSet};

use super::*;
use batchrouter_core::Timestamp;
use serde_json::{json, Value};

fn settings(extra: Value) -> Settings {
    let mut c = json!({
        "munchkinId": "1-A", "clientId": "c", "clientSecret": "s",
        "columnFieldsMapping": [{"from": "email", "to": "email"}, {"from": "last", "to": "lastName"}, {"from": "first", "to": "firstName"}],
        "passUnmappedFields": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    Settings::from_config(&c).unwrap()
}

fn stage(dir: &Path, lines: &[String]) -> StagedBatch {
    let path = dir.join("staged.jsonl");
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, &text).unwrap();
    StagedBatch {
        batch_id: "b".into(),
        destination_id: "m".into(),
        destination_type: "MARKETO_BULK_UPLOAD".into(),
        path,
        job_ids: (1..=lines.len() as i64).collect(),
        bytes: text.len() as u64,
        attempt: 1,
        created_at: Timestamp(0),
    }
}

fn read(f: &ImportFile) -> Vec<Vec<String>> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(false)
        .from_path(&f.path)
        .unwrap();
    r.records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect()
}

fn check_sizes(plan: &Plan, max: u64) {
    for f in &plan.files {
        assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes);
        assert!(f.bytes <= max, "{} > {max}", f.bytes);
        assert_eq!(f.keys.len(), f.job_ids.len());
        let unique: HashSet<&String> = f.keys.iter().collect();
        assert_eq!(unique.len(), f.keys.len(), "keys unique within a file");
    }
}

#[test]
fn header_is_mapping_order_then_sorted_extras_and_quoting_is_rfc4180() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        json!({"email": "a@x.io", "firstName": "A", "zeta": "1"}).to_string(),
        json!({"email": "B@x.io", "lastName": "Quote \"me\", please", "alpha": "line\nbreak", "we,ird": "\r"})
            .to_string(),
    ];
    let batch = stage(dir.path(), &lines);
    let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
    assert_eq!(plan.files.len(), 1);
    let f = &plan.files[0];
    assert_eq!(
        f.columns,
        vec!["email", "lastName", "firstName", "alpha", "we,ird", "zeta"]
    );
    let raw = std::fs::read_to_string(&f.path).unwrap();
    assert!(
        raw.starts_with("email,lastName,firstName,alpha,\"we,ird\",zeta\r\n"),
        "{raw}"
    );
    assert!(raw.contains("\"Quote \"\"me\"\", please\""), "{raw}");
    assert_eq!(raw.len() as u64, f.bytes);
    let rows = read(f);
    assert_eq!(rows[1], vec!["a@x.io", "", "A", "", "", "1"]);
    assert_eq!(
        rows[2],
        vec![
            "B@x.io",
            "Quote \"me\", please",
            "",
            "line\nbreak",
            "\r",
            ""
        ]
    );
    assert_eq!(f.job_ids, vec![1, 2]);
    assert_eq!(f.keys, vec!["a@x.io", "b@x.io"]);
}

#[test]
fn the_csv_matches_what_the_csv_crate_writes() {
    let dir = tempfile::tempdir().unwrap();
    let values = [
        "plain", "", " spaced ", "a,b", "q\"q", "\"", "x\r\ny", "ünï", "#hash", "'",
    ];
    let lines: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"email": format!("k{i}@x.io"), "v": v}).to_string())
        .collect();
    let batch = stage(dir.path(), &lines);
    let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    w.write_record(["email", "v"]).unwrap();
    for (i, v) in values.iter().enumerate() {
        w.write_record([format!("k{i}@x.io").as_str(), v]).unwrap();
    }
    let expected = w.into_inner().unwrap();
    assert_eq!(std::fs::read(&plan.files[0].path).unwrap(), expected);
}

#[test]
fn duplicates_move_to_later_files_in_order_and_size_splits() {
    let dir = tempfile::tempdir().unwrap();
    // Job 1, 3, 5 share a key (differently cased); job 3 must land after 1, and 5 after 3.
    let lines: Vec<String> = [
        "Dup@x.io",
        "u1@x.io",
        " dup@x.io",
        "u2@x.io",
        "DUP@X.IO",
        "u3@x.io",
    ]
    .iter()
    .map(|e| json!({"email": e}).to_string())
    .collect();
    let batch = stage(dir.path(), &lines);
    let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
    assert!(plan.decided.is_empty());
    let ids: Vec<Vec<JobId>> = plan.files.iter().map(|f| f.job_ids.clone()).collect();
    assert_eq!(ids, vec![vec![1, 2, 4, 6], vec![3], vec![5]]);
    check_sizes(&plan, 9_500_000);

    // A tiny limit splits by size and keeps every file under it.
    let many: Vec<String> = (0..200)
        .map(|i| {
            json!({"email": format!("user{i}@example.com"), "firstName": "x".repeat(100)})
                .to_string()
        })
        .collect();
    let batch = stage(dir.path(), &many);
    let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": 2000}))).unwrap();
    assert_eq!(plan.files.len(), MAX_FILES_PER_UPLOAD);
    check_sizes(&plan, 2000);
    let placed: usize = plan.files.iter().map(|f| f.job_ids.len()).sum();
    assert_eq!(placed + plan.decided.len(), 200);
    assert!(plan
        .decided
        .iter()
        .all(|(_, o)| matches!(o, Outcome::Throttled(e) if e.message.starts_with("not sent"))));
    // Files are filled: each one plus the next file's first row is over the limit.
    for pair in plan.files.windows(2) {
        assert!(pair[0].bytes + 140 > 2000, "{}", pair[0].bytes);
    }
}

#[test]
fn oversized_rows_and_unreadable_lines_are_decided_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        json!({"email": "ok@x.io"}).to_string(),
        json!({"email": "big@x.io", "notes": "n".repeat(3000)}).to_string(),
        "not json".to_string(),
        json!({"firstName": "no key"}).to_string(),
        json!({"email": "n@x.io", "score": 5}).to_string(),
        r#"{"email": "t@x.io", "email": "u@x.io"}"#.to_string(),
    ];
    let batch = stage(dir.path(), &lines);
    let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": 2000}))).unwrap();
    assert_eq!(plan.files.len(), 1);
    assert_eq!(plan.files[0].job_ids, vec![1]);
    let mut decided = plan.decided.clone();
    decided.sort_by_key(|(id, _)| *id);
    let reasons: Vec<(JobId, ErrorCode, String)> = decided
        .into_iter()
        .map(|(id, o)| match o {
            Outcome::Aborted(e) => (id, e.code, e.message),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert_eq!(reasons[0].1, ErrorCode::RecordRejected);
    assert!(reasons[0].2.contains("import file limit"), "{reasons:?}");
    assert_eq!(reasons[1].1, ErrorCode::TransformFailed);
    assert!(reasons[2].2.contains("lookup field `email`"), "{reasons:?}");
    assert!(
        reasons[3].2.contains("not a mapped lead row"),
        "{reasons:?}"
    );
    assert!(reasons[4].2.contains("`email` twice"), "{reasons:?}");
}

#[test]
fn a_short_staged_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut batch = stage(dir.path(), &[json!({"email": "a@b.c"}).to_string()]);
    batch.job_ids.push(99);
    let err = plan_import_files(&batch, &settings(json!({}))).unwrap_err();
    assert!(err.to_string().contains("ended 1 line(s) early"), "{err}");
}

/// The bound `limits()` relies on: rows that carry the same fields fit
/// into ten files whenever their staged JSON is at most five file limits,
/// whatever their sizes (up to the file limit) and their escaping.
#[test]
fn same_field_batches_up_to_five_file_limits_fit_in_ten_files() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4_000u64;
    for seed in 0..40u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut lines = Vec::new();
        let mut bytes = 0u64;
        let mut i = 0;
        loop {
            let len = match rng.u8(..4) {
                0 => rng.usize(1..30),
                1 => rng.usize(30..400),
                2 => rng.usize(400..2_000),
                _ => rng.usize(2_000..3_900),
            };
            let filler: String = (0..len)
                .map(|_| ['a', ',', '"', '\n', 'é', ' '][rng.usize(..6)])
                .collect();
            let line = json!({"email": format!("p{i}@x.io"), "notes": filler}).to_string();
            if bytes + line.len() as u64 + 1 > 5 * max {
                break;
            }
            bytes += line.len() as u64 + 1;
            lines.push(line);
            i += 1;
        }
        let batch = stage(dir.path(), &lines);
        assert!(batch.bytes <= 5 * max);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
        check_sizes(&plan, max);
        let throttled = plan
            .decided
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Throttled(_)))
            .count();
        assert_eq!(throttled, 0, "seed {seed}: {} files", plan.files.len());
        assert!(plan.files.len() <= MAX_FILES_PER_UPLOAD);
    }
}

/// Rows with differing fields: each file's header holds only its own
/// columns, so a batch whose rows each carry an extra field of their own
/// costs far less than with one header for the whole batch.
#[test]
fn sparse_rows_pay_only_for_the_columns_of_their_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let max = 9_000u64;
    let lines: Vec<String> = (0..300)
        .map(|i| json!({"email": format!("s{i}@x.io"), format!("field{i}"): "v"}).to_string())
        .collect();
    let batch = stage(dir.path(), &lines);
    assert!(batch.bytes < 5 * max, "{} staged bytes", batch.bytes);
    // One header for all 301 columns would be ~2.7 KB and every row
    // ~310 bytes: over 90 KB, far more than ten 9 KB files.
    let one_header_bytes: u64 = 300 * (12 + 300 + 2) + 2_700;
    assert!(one_header_bytes > 10 * max);
    let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
    check_sizes(&plan, max);
    assert!(plan.decided.is_empty(), "{:?}", plan.decided.first());
    assert!(plan.files.len() <= MAX_FILES_PER_UPLOAD);
    for f in &plan.files {
        assert_eq!(f.columns.len(), f.job_ids.len() + 1, "email + one per row");
        let rows = read(f);
        assert_eq!(rows[0], f.columns);
        assert_eq!(rows.len(), f.job_ids.len() + 1);
    }
    let placed: Vec<JobId> = plan
        .files
        .iter()
        .flat_map(|f| f.job_ids.iter().copied())
        .collect();
    assert_eq!(placed, (1..=300).collect::<Vec<_>>());
}

/// Rows so sparse that even per-file headers need more than ten files:
/// the rest waits for a later upload with a reason that says why.
#[test]
fn rows_beyond_ten_files_wait_for_a_later_upload() {
    let dir = tempfile::tempdir().unwrap();
    let max = 2_000u64;
    let lines: Vec<String> = (0..400)
        .map(|i| json!({"email": format!("s{i}@x.io"), format!("field{i}"): "v"}).to_string())
        .collect();
    let batch = stage(dir.path(), &lines);
    // Under the 10 × maxFileSize this destination used to report.
    assert!(batch.bytes <= 10 * max, "{}", batch.bytes);
    let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
    check_sizes(&plan, max);
    assert_eq!(plan.files.len(), MAX_FILES_PER_UPLOAD);
    let placed: usize = plan.files.iter().map(|f| f.job_ids.len()).sum();
    assert!(placed > 0 && placed < 400);
    assert_eq!(placed + plan.decided.len(), 400, "no job lost");
    for (_, o) in &plan.decided {
        match o {
            Outcome::Throttled(e) => {
                assert_eq!(e.code, ErrorCode::Throttled);
                assert!(e.message.contains("cost a cell per absent field"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn waiting_rows_keep_their_order_across_many_rounds() {
    let dir = tempfile::tempdir().unwrap();
    // Four values, each repeated five times with other leads between them.
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let email = if i % 2 == 0 {
                format!("k{}@x.io", (i / 2) % 4)
            } else {
                format!("solo{i}@x.io")
            };
            json!({"email": email, "n": i.to_string()}).to_string()
        })
        .collect();
    let batch = stage(dir.path(), &lines);
    let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
    assert_eq!(plan.files.len(), 5);
    check_sizes(&plan, 9_500_000);
    let mut last_file: HashMap<String, usize> = HashMap::new();
    let mut last_n: HashMap<String, i64> = HashMap::new();
    for (i, f) in plan.files.iter().enumerate() {
        for (row, key) in read(f).iter().skip(1).zip(&f.keys) {
            assert_eq!(row[0].to_lowercase(), *key);
            let n: i64 = row[1].parse().unwrap();
            if let Some(prev) = last_file.insert(key.clone(), i) {
                assert!(prev < i, "{key} twice in a file or out of order");
                assert!(last_n[key] < n, "{key} out of order");
            }
            last_n.insert(key.clone(), n);
        }
    }
}
