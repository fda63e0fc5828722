//! A lead row, parsed once from its staged line and never again.
//!
//! [`LineParser`] reads the line with a borrowing serde visitor (no
//! `serde_json::Value`, no copy of unescaped text), interns each field name
//! as a column, CSV-encodes each value straight into the row's buffer and
//! normalises the lookup value. From then on a [`Row`] is plain bytes plus
//! `(column, end)` pairs: cheap to measure, to spill to a row file and to
//! write out in any header order.

use std::borrow::Cow;
use std::fmt;

use batchrouter_core::JobId;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::columns::Columns;
use super::encoding::encode_cell;
use crate::config::Settings;
use crate::transform::normalise_key;

/// One lead row, parsed once: its present cells already CSV-encoded back to
/// back in `data`, each with its column id and end offset.
#[derive(Debug, Default)]
pub(super) struct Row {
    pub(super) id: JobId,
    pub(super) key: String,
    pub(super) data: Vec<u8>,
    pub(super) cells: Vec<(u32, u32)>,
}

impl Row {
    pub(super) fn clear(&mut self, id: JobId) {
        self.id = id;
        self.key.clear();
        self.data.clear();
        self.cells.clear();
    }

    pub(super) fn content_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// `(column, start, end)` of every present cell.
    pub(super) fn spans(&self) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        let mut start = 0usize;
        self.cells.iter().map(move |&(col, end)| {
            let s = start;
            start = end as usize;
            (col, s, end as usize)
        })
    }
}

/// A staged line's fields, borrowed from the line where no escape forces a copy.
struct Fields<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of text fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    fields.push((k.0, v.0));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// Turns staged lines into rows.
pub(super) struct LineParser {
    lookup: String,
    seen: Vec<u32>,
    generation: u32,
}

impl LineParser {
    pub(super) fn new(settings: &Settings) -> Self {
        LineParser {
            lookup: settings.lookup_field.clone(),
            seen: Vec::new(),
            generation: 0,
        }
    }

    /// Parses one staged line into `row`; a line `transform` wrote always parses.
    pub(super) fn parse(
        &mut self,
        id: JobId,
        line: &str,
        columns: &mut Columns,
        row: &mut Row,
    ) -> Result<(), String> {
        let fields: Fields = serde_json::from_str(line)
            .map_err(|e| format!("staged line is not a mapped lead row: {e}"))?;
        row.clear(id);
        self.generation = self.generation.wrapping_add(1).max(1);
        let mut key = None;
        for (name, value) in &fields.0 {
            let col = columns.intern(name);
            let slot = col as usize;
            if slot >= self.seen.len() {
                self.seen.resize(slot + 1, 0);
            }
            if self.seen[slot] == self.generation {
                return Err(format!("staged row names the field `{name}` twice"));
            }
            self.seen[slot] = self.generation;
            if *name == self.lookup {
                key = Some(value);
            }
            encode_cell(value, &mut row.data);
            row.cells.push((col, row.data.len() as u32));
        }
        match key {
            Some(v) if !v.trim().is_empty() => {
                row.key.push_str(&normalise_key(v));
                Ok(())
            }
            _ => Err(format!(
                "staged row has no value for the lookup field `{}`",
                self.lookup
            )),
        }
    }
}
