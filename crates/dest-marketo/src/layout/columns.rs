//! Column interning: every field name seen in the batch gets a small id, so
//! a row carries `(u32, u32)` pairs instead of strings and the planner can
//! track "is this column already in the file being filled" with one array.
//!
//! A column also knows its encoded header width (for the size arithmetic)
//! and its header rank: `columnFieldsMapping` targets first in mapping
//! order, then every other field by name, which is the order of each file's
//! header.

use std::collections::HashMap;

use super::encoding::encode_cell;
use crate::config::Settings;

/// Every column seen in the batch, by a small id, with its header order rank.
pub(super) struct Columns {
    ids: HashMap<String, u32>,
    pub(super) names: Vec<String>,
    pub(super) encoded_len: Vec<u64>,
    rank: Vec<usize>,
    mapping: HashMap<String, usize>,
}

impl Columns {
    /// No columns yet; ranks come from the mapping in `settings`.
    pub(super) fn new(settings: &Settings) -> Self {
        Columns {
            ids: HashMap::new(),
            names: Vec::new(),
            encoded_len: Vec::new(),
            rank: Vec::new(),
            mapping: settings
                .mapping
                .iter()
                .enumerate()
                .map(|(i, m)| (m.to.clone(), i))
                .collect(),
        }
    }

    /// The id of `name`, given on first sight.
    pub(super) fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        let mut enc = Vec::new();
        encode_cell(name, &mut enc);
        self.encoded_len.push(enc.len() as u64);
        self.rank
            .push(self.mapping.get(name).copied().unwrap_or(usize::MAX));
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Header order: mapping targets in mapping order, then by name.
    pub(super) fn order(&self, cols: &mut [u32]) {
        cols.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            self.rank[a]
                .cmp(&self.rank[b])
                .then_with(|| self.names[a].cmp(&self.names[b]))
        });
    }
}
