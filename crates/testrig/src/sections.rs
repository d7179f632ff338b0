//! Many checks per rig boot: a script prints `=== name` before each check (the script prelude
//! defines `section name` for it), and [`Sections`] splits the output back into named parts.

/// Lines starting with this open a section.
pub const SECTION_MARK: &str = "=== ";

#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    #[error(
        "the rig script printed no section {name:?} (sections: {found:?}); did an earlier command hang or the script stop? Output:\n{output}"
    )]
    Missing {
        name: String,
        found: Vec<String>,
        output: String,
    },
}

/// The parts of a script's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sections {
    /// Text before the first marker.
    pub preamble: String,
    /// (name, body) in output order; a body is the lines after its marker, each ending in `\n`.
    pub parts: Vec<(String, String)>,
}

impl Sections {
    pub fn parse(output: &str) -> Self {
        let mut s = Self::default();
        for line in output.lines() {
            if let Some(name) = line.strip_prefix(SECTION_MARK) {
                s.parts.push((name.trim().to_owned(), String::new()));
                continue;
            }
            let body = match s.parts.last_mut() {
                Some((_, body)) => body,
                None => &mut s.preamble,
            };
            body.push_str(line);
            body.push('\n');
        }
        s
    }

    /// The body of section `name` (the first, if the name repeats).
    pub fn get(&self, name: &str) -> Result<&str, SectionError> {
        self.parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_str())
            .ok_or_else(|| SectionError::Missing {
                name: name.to_owned(),
                found: self.parts.iter().map(|(n, _)| n.clone()).collect(),
                output: self.render(),
            })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(n, _)| n.as_str())
    }

    fn render(&self) -> String {
        let mut out = self.preamble.clone();
        for (n, b) in &self.parts {
            out.push_str(SECTION_MARK);
            out.push_str(n);
            out.push('\n');
            out.push_str(b);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_on_markers_keeping_preamble_and_order() {
        let out =
            "boot noise\n=== kvm\ncrw-rw---- /dev/kvm\n=== empty\n=== payload\nhello\nstatus=0\n";
        let s = Sections::parse(out);
        assert_eq!(s.preamble, "boot noise\n");
        assert_eq!(s.names().collect::<Vec<_>>(), ["kvm", "empty", "payload"]);
        assert_eq!(s.get("kvm").unwrap(), "crw-rw---- /dev/kvm\n");
        assert_eq!(s.get("empty").unwrap(), "");
        assert_eq!(s.get("payload").unwrap(), "hello\nstatus=0\n");
        assert_eq!(s.render(), out);
    }

    #[test]
    fn sections_missing_names_what_was_found() {
        let s = Sections::parse("=== a\nx\n");
        let e = s.get("b").unwrap_err().to_string();
        assert!(
            e.contains("\"b\"") && e.contains("[\"a\"]") && e.contains("x"),
            "{e}"
        );
    }
}
