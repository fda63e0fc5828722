//! The row file: rows spilled to a temp file in a compact binary form.
//!
//! A batch can be larger than memory should hold, and rows must wait twice:
//! the current file's rows until its header is final, and rows whose lookup
//! value repeats until a later file. Both wait here, as the already-encoded
//! bytes of a [`Row`], so nothing is parsed or encoded a second time. The
//! format is private to one plan and never outlives it (the temp file is
//! deleted when dropped), so it carries no version or checksum.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use batchrouter_core::JobId;
use tempfile::TempPath;

use super::row::Row;

/// Rows in a compact binary form in a temp file (deleted when dropped):
/// per row `id: i64, key length: u32, cells: u32, data length: u32`, the
/// key, `(column: u32, end: u32)` per cell, then the encoded cells.
pub(super) struct RowFile {
    out: BufWriter<File>,
    path: TempPath,
}

impl RowFile {
    /// An empty row file in `dir`, named `prefix…`.
    pub(super) fn create(dir: &Path, prefix: &str) -> io::Result<RowFile> {
        let (file, path) = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(dir)?
            .into_parts();
        Ok(RowFile {
            out: BufWriter::with_capacity(64 * 1024, file),
            path,
        })
    }

    /// Appends `row`.
    pub(super) fn push(&mut self, row: &Row) -> io::Result<()> {
        let w = &mut self.out;
        w.write_all(&row.id.to_le_bytes())?;
        w.write_all(&(row.key.len() as u32).to_le_bytes())?;
        w.write_all(&(row.cells.len() as u32).to_le_bytes())?;
        w.write_all(&(row.data.len() as u32).to_le_bytes())?;
        w.write_all(row.key.as_bytes())?;
        for &(col, end) in &row.cells {
            w.write_all(&col.to_le_bytes())?;
            w.write_all(&end.to_le_bytes())?;
        }
        w.write_all(&row.data)
    }

    /// Flushes and reopens the file to read the rows back in order.
    pub(super) fn into_reader(mut self) -> io::Result<RowReader> {
        self.out.flush()?;
        Ok(RowReader {
            reader: BufReader::with_capacity(64 * 1024, File::open(&self.path)?),
            _path: self.path,
        })
    }
}

/// Reads a row file back; the file is deleted when the reader is dropped.
pub(super) struct RowReader {
    reader: BufReader<File>,
    _path: TempPath,
}

impl RowReader {
    /// Reads the next row into `row`; false at the end.
    pub(super) fn next_into(&mut self, row: &mut Row) -> io::Result<bool> {
        if self.reader.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let mut head = [0u8; 20];
        self.reader.read_exact(&mut head)?;
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let [a, b, c, d, e, f, g, h, ..] = head;
        let id = JobId::from_le_bytes([a, b, c, d, e, f, g, h]);
        let (key_len, cells, data_len) = (u32_at(8), u32_at(12), u32_at(16));
        row.clear(id);
        let mut key = vec![0u8; key_len as usize];
        self.reader.read_exact(&mut key)?;
        row.key = String::from_utf8(key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "corrupt row file"))?;
        let mut pair = [0u8; 8];
        for _ in 0..cells {
            self.reader.read_exact(&mut pair)?;
            row.cells.push((
                u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]),
                u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]),
            ));
        }
        row.data.resize(data_len as usize, 0);
        self.reader.read_exact(&mut row.data)?;
        Ok(true)
    }
}
