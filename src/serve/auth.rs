//! The bearer token: where a server or the shell takes it from, and how a request's is checked.
//!
//! A token given as `--token` is visible to every user of the machine in `/proc/PID/cmdline`;
//! `--token-file PATH` and the environment variable [`TOKEN_ENV`] are not. A request's token is
//! compared in constant time, so that how long a refusal takes says nothing about how much of
//! the token a guess got right (only its length, which is not the secret).

use std::path::Path;

use subtle::ConstantTimeEq;

/// The environment variable a token is taken from when neither `--token` nor `--token-file` is
/// given.
pub const TOKEN_ENV: &str = "CLICKAGG_TOKEN";

/// The token a request must carry as `Authorization: Bearer TOKEN`.
pub struct Token {
    /// `Bearer TOKEN`, the whole header value a request must send.
    expected: Vec<u8>,
}

impl Token {
    /// A token, refused when empty or when it holds what no header value can carry (control
    /// characters, spaces at its ends).
    pub fn new(secret: &str) -> Result<Token, String> {
        if secret.is_empty() {
            return Err("the token is empty".into());
        }
        if secret.trim() != secret || secret.chars().any(|c| c.is_control()) {
            return Err("the token has spaces at its ends or control characters, which no Authorization header can carry".into());
        }
        Ok(Token { expected: format!("Bearer {secret}").into_bytes() })
    }

    /// Whether `header`, the request's `Authorization` value, is this token. Takes the same time
    /// for every header of the same length.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        header.is_some_and(|value| bool::from(value.ct_eq(&self.expected)))
    }
}

/// The token: `flag` (`--token`) if given, else the first line of `file` (`--token-file`), else
/// the environment's [`TOKEN_ENV`] if set; `None` when there is none. A file that cannot be read
/// or holds no token, and a token no header can carry, are errors that say which source it was.
pub fn resolve(flag: Option<String>, file: Option<&Path>) -> Result<Option<String>, String> {
    let (token, source) = if let Some(token) = flag {
        (token, "--token".to_string())
    } else if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
        (token, format!("the token file {}", path.display()))
    } else {
        match std::env::var(TOKEN_ENV) {
            Ok(token) => (token, format!("${TOKEN_ENV}")),
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => return Err(format!("${TOKEN_ENV} is not valid UTF-8")),
        }
    };
    Token::new(&token).map_err(|e| format!("{source}: {e}"))?;
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_header_is_admitted() {
        let token = Token::new("s3cret").unwrap();
        assert!(token.admits(Some(b"Bearer s3cret")));
        for wrong in [&b"Bearer s3cre"[..], b"Bearer s3cretx", b"Bearer S3cret", b"bearer s3cret", b"s3cret", b""] {
            assert!(!token.admits(Some(wrong)), "{:?}", String::from_utf8_lossy(wrong));
        }
        assert!(!token.admits(None));
    }

    #[test]
    fn tokens_no_header_can_carry_are_refused() {
        for bad in ["", " padded", "padded ", "new\nline", "tab\there"] {
            assert!(Token::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_gives_its_first_line_and_the_flag_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\r\nignored\n").unwrap();
        assert_eq!(resolve(None, Some(&path)).unwrap().as_deref(), Some("from-file"));
        assert_eq!(resolve(Some("flag".into()), Some(&path)).unwrap().as_deref(), Some("flag"));
        std::fs::write(&path, "\n").unwrap();
        assert!(resolve(None, Some(&path)).unwrap_err().contains("token file"));
        assert!(resolve(None, Some(&dir.path().join("missing"))).unwrap_err().contains("cannot read"));
    }
}
