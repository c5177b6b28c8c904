//! Every command produces a [`Report`]: a JSON value for `-o json|yaml` and a table
//! for people (`-o table`, the default).

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

pub struct Report {
    pub data: Value,
    /// Header and rows of the table view.
    pub table: Option<(Vec<&'static str>, Vec<Vec<String>>)>,
    /// Lines printed after the table (summary, hints).
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(data: Value) -> Self {
        Self {
            data,
            table: None,
            notes: Vec::new(),
        }
    }

    pub fn table(mut self, header: Vec<&'static str>, rows: Vec<Vec<String>>) -> Self {
        self.table = Some((header, rows));
        self
    }

    pub fn note(mut self, line: impl Into<String>) -> Self {
        self.notes.push(line.into());
        self
    }

    pub fn render(&self, f: Format) -> String {
        match f {
            Format::Json => serde_json::to_string_pretty(&self.data).unwrap_or_default() + "\n",
            Format::Yaml => serde_yaml::to_string(&self.data).unwrap_or_default(),
            Format::Table => {
                let mut out = String::new();
                if let Some((header, rows)) = self.table.as_ref().filter(|(_, r)| !r.is_empty()) {
                    out.push_str(&table(header, rows));
                }
                for n in &self.notes {
                    out.push_str(n);
                    out.push('\n');
                }
                out
            }
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_table() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "ok".into()],
                vec!["longer".into(), "failed".into()],
            ],
        );
        assert_eq!(t, "NAME    STATE\na       ok\nlonger  failed\n");
    }
}
