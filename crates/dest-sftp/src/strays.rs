//! `.part` files that failed uploads may have left on the server.
//!
//! An upload that breaks after creating `<name>.part` (server killed, connection
//! lost, `ioTimeout`, the router's upload timeout) cannot remove it: the
//! session is gone. A retry of the same batch rewrites and renames that
//! `.part`, but a retry does not always get the same name (jobs re-driven or
//! batched with new ones, time macros in `filePath`). So the uploader
//! remembers such paths here and removes them after its next successful
//! connect.
//!
//! The list lives in memory only: a process that crashes or restarts
//! forgets it, and what it held stays on the server (see the crate's docs for
//! how operators find such files).

use std::collections::VecDeque;

/// At most this many paths are remembered; beyond it the oldest is dropped
/// (and logged), so a server that keeps failing cannot grow the list without
/// bound.
pub(crate) const MAX_STRAY_PARTS: usize = 1024;

/// Remote `.part` paths to remove, oldest first, without duplicates.
#[derive(Debug, Default)]
pub(crate) struct StrayParts {
    paths: VecDeque<String>,
}

impl StrayParts {
    /// Remembers `path`; returns the path dropped to stay within
    /// [`MAX_STRAY_PARTS`], if any.
    pub(crate) fn remember(&mut self, path: &str) -> Option<String> {
        if self.paths.iter().any(|p| p == path) {
            return None;
        }
        self.paths.push_back(path.to_string());
        if self.paths.len() > MAX_STRAY_PARTS {
            self.paths.pop_front()
        } else {
            None
        }
    }

    /// Forgets `path` (it was renamed to its final name, or removed).
    pub(crate) fn forget(&mut self, path: &str) {
        self.paths.retain(|p| p != path);
    }

    /// Takes every remembered path except `keep` (the part the current
    /// upload is about to rewrite), oldest first.
    pub(crate) fn take_except(&mut self, keep: &str) -> Vec<String> {
        let (kept, taken): (VecDeque<String>, VecDeque<String>) = std::mem::take(&mut self.paths)
            .into_iter()
            .partition(|p| p == keep);
        self.paths = kept;
        taken.into()
    }

    /// How many paths are remembered.
    pub(crate) fn len(&self) -> usize {
        self.paths.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_once_takes_all_but_the_current_part_and_forgets() {
        let mut s = StrayParts::default();
        assert_eq!(s.remember("/in/a.csv.part"), None);
        assert_eq!(s.remember("/in/b.csv.part"), None);
        assert_eq!(s.remember("/in/a.csv.part"), None);
        assert_eq!(s.remember("/in/c.csv.part"), None);
        assert_eq!(s.len(), 3);

        assert_eq!(
            s.take_except("/in/b.csv.part"),
            vec!["/in/a.csv.part".to_string(), "/in/c.csv.part".to_string()]
        );
        assert_eq!(s.len(), 1, "the current part stays remembered");
        s.forget("/in/b.csv.part");
        assert_eq!(s.len(), 0);
        assert!(s.take_except("/in/x.part").is_empty());
    }

    #[test]
    fn the_list_is_bounded_and_drops_the_oldest() {
        let mut s = StrayParts::default();
        for i in 0..MAX_STRAY_PARTS {
            assert_eq!(s.remember(&format!("/p{i}.part")), None);
        }
        assert_eq!(s.remember("/newest.part"), Some("/p0.part".to_string()));
        assert_eq!(s.len(), MAX_STRAY_PARTS);
        let all = s.take_except("");
        assert_eq!(all.first().map(String::as_str), Some("/p1.part"));
        assert_eq!(all.last().map(String::as_str), Some("/newest.part"));
    }
}
