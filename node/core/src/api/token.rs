//! The API token: what guards control calls, and how a request proves it.
//!
//! A client sends `authorization: Bearer <token>`. Comparison takes the same
//! time wherever the first wrong byte is, so the token cannot be guessed a
//! byte at a time from response times.

use std::fmt;
use std::path::Path;

/// Metadata key that carries the token.
pub const AUTHORIZATION: &str = "authorization";

/// Refuses a control call `call` without the right token (when `token`
/// is set); `owner` names whose token it is in the refusal.
pub fn check<T>(
    token: Option<&ApiToken>,
    request: &tonic::Request<T>,
    call: &str,
    owner: &str,
) -> Result<(), tonic::Status> {
    let Some(token) = token else { return Ok(()) };
    let header = request.metadata().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if token.admits(header) {
        return Ok(());
    }
    Err(tonic::Status::unauthenticated(format!(
        "{call} needs the {owner}'s API token as `authorization: Bearer <token>`{}",
        if header.is_some() { " (the one given is wrong)" } else { "" }
    )))
}

/// A secret shared by the node and its operators.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// A token given as text: at least 8 characters, no whitespace or
    /// control characters (it travels in an HTTP/2 header).
    pub fn new(text: &str) -> Result<ApiToken, String> {
        if text.chars().count() < 8 {
            return Err(format!(
                "the API token must be at least 8 characters (got {})",
                text.chars().count()
            ));
        }
        if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(format!(
                "the API token must be printable ASCII without spaces (found {c:?})"
            ));
        }
        Ok(ApiToken(text.to_string()))
    }

    /// A token kept in a file (its first line, trimmed).
    pub fn from_file(path: &Path) -> Result<ApiToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the API token file {}: {e}", path.display()))?;
        ApiToken::new(text.lines().next().unwrap_or_default().trim())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The header value a client sends.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `header` (an `authorization` value) carries this token.
    pub fn admits(&self, header: Option<&str>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else { return false };
        let (a, b) = (given.as_bytes(), self.0.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, byte) in b.iter().enumerate() {
            diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
        }
        diff == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let t = ApiToken::new("s3cret-token").unwrap();
        assert!(t.admits(Some("Bearer s3cret-token")));
        for bad in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "s3cret-token",
            "Bearer ",
            "Basic s3cret-token",
        ] {
            assert!(!t.admits(Some(bad)), "{bad}");
        }
        assert!(!t.admits(None));
        assert_eq!(format!("{t:?}"), "ApiToken(..)", "never printed");
    }

    #[test]
    fn weak_or_unsendable_tokens_are_refused() {
        assert!(ApiToken::new("short").unwrap_err().contains("(got 5)"));
        assert!(ApiToken::new("has a space").unwrap_err().contains("' '"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file-123\n").unwrap();
        assert!(ApiToken::from_file(&file).unwrap().admits(Some("Bearer from-a-file-123")));
        assert!(ApiToken::from_file(&dir.path().join("none")).unwrap_err().contains("cannot read"));
    }
}
