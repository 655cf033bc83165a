//! Character-level text: reads a UTF-8 file into tokens over a sorted
//! vocabulary of its distinct characters, so that every node reading the same
//! file derives the same ids. Choosing the held-out part is `load`'s job.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::dataset::TextData;

/// The largest text file accepted.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Why a text file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read text file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("text file {} is larger than the {MAX_TEXT_BYTES}-byte (1 GiB) limit; use a smaller file", path.display())]
    TooLarge { path: PathBuf },
    #[error("text file {} is not valid UTF-8 at byte offset {offset}; convert it to UTF-8 (e.g. with iconv)", path.display())]
    InvalidUtf8 { path: PathBuf, offset: usize },
    #[error("text file {} is empty; --data text needs a non-empty UTF-8 file", path.display())]
    Empty { path: PathBuf },
}

/// Reads `path` as UTF-8 and tokenises it character by character.
pub fn load_text(path: &Path) -> Result<TextData, TextError> {
    let io_err = |source| TextError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io_err)?;
    // `take` bounds the read even where the metadata size is not the truth
    // (pipes, /proc files).
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_BYTES + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(TextError::TooLarge { path: path.to_path_buf() });
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| TextError::InvalidUtf8 {
        path: path.to_path_buf(),
        offset: e.valid_up_to(),
    })?;
    if text.is_empty() {
        return Err(TextError::Empty { path: path.to_path_buf() });
    }
    Ok(tokenize(text))
}

/// Tokens of `text` over its sorted distinct characters.
pub fn tokenize(text: &str) -> TextData {
    // ASCII goes through tables; other characters through the sorted vocab.
    let mut ascii_seen = [false; 128];
    let mut other = BTreeSet::new();
    for c in text.chars() {
        match ascii_seen.get_mut(c as usize) {
            Some(seen) => *seen = true,
            None => {
                other.insert(c);
            }
        }
    }
    let vocab: Vec<char> =
        (0u8..128).filter(|&b| ascii_seen[usize::from(b)]).map(char::from).chain(other).collect();
    let mut ascii_id = [0u32; 128];
    for (id, &c) in vocab.iter().enumerate().take_while(|(_, c)| c.is_ascii()) {
        ascii_id[c as usize] = id as u32;
    }
    let tokens = text
        .chars()
        .map(|c| match ascii_id.get(c as usize) {
            Some(&id) => id,
            // Every character of `text` is in `vocab`, so the search finds it.
            None => vocab.binary_search(&c).unwrap_or_default() as u32,
        })
        .collect();
    TextData { tokens, vocab }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::load::test_data_dir;

    #[test]
    fn tokenizes_over_sorted_distinct_characters() {
        let t = tokenize("héllo, wörld\n");
        assert_eq!(t.vocab, vec!['\n', ' ', ',', 'd', 'h', 'l', 'o', 'r', 'w', 'é', 'ö']);
        let decoded: String = t.tokens.iter().map(|&i| t.vocab[i as usize]).collect();
        assert_eq!(decoded, "héllo, wörld\n");
        assert_eq!(t.tokens[..3], [4, 9, 5]);
    }

    #[test]
    fn rejects_empty_and_invalid_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(load_text(&path), Err(TextError::Empty { .. })));
        std::fs::write(&path, b"abc\xffdef").unwrap();
        let err = load_text(&path).unwrap_err();
        assert!(matches!(err, TextError::InvalidUtf8 { offset: 3, .. }), "{err}");
        assert!(err.to_string().contains("byte offset 3") && err.to_string().contains("t.txt"));
        std::fs::write(&path, "ab").unwrap();
        assert_eq!(load_text(&path).unwrap().tokens, vec![0, 1]);
        assert!(matches!(load_text(&dir.path().join("missing")), Err(TextError::Io { .. })));
    }

    #[test]
    fn real_tiny_shakespeare() {
        let t = load_text(&test_data_dir().join("tinyshakespeare/input.txt")).unwrap();
        assert_eq!(t.len(), 1_115_394);
        assert_eq!(t.vocab.len(), 65);
        let start: String = t.tokens[..14].iter().map(|&i| t.vocab[i as usize]).collect();
        assert_eq!(start, "First Citizen:");
    }
}
