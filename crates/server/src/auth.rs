//! The admin bearer token: operations that change the cluster's shape
//! (tables, membership, leadership moves, backup and restore, reset) need
//! `authorization: Bearer <token>` when the node has one. etcd clients may
//! send it as their `token` header instead. The token is compared in
//! constant time and never printed.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// The longest token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// A secret that admin requests must present.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// A token of visible ASCII characters (it travels in an HTTP/2
    /// header), 16 to `TOKEN_BYTES_MAX` bytes long.
    pub fn new(token: &str) -> Result<AdminToken> {
        let token = token.trim();
        if token.len() < 16 {
            return Err(Error::Config(
                "the admin token is shorter than 16 characters".into(),
            ));
        }
        if token.len() > TOKEN_BYTES_MAX {
            return Err(Error::Config(format!(
                "the admin token is longer than {TOKEN_BYTES_MAX} bytes"
            )));
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(Error::Config(
                "the admin token must be visible ASCII characters, without spaces".into(),
            ));
        }
        Ok(AdminToken(Arc::from(token.as_bytes())))
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_ref().ct_eq(presented))
    }
}

/// Allows `operation` when the node has no token or `metadata` carries it.
pub fn check_admin(
    token: Option<&AdminToken>,
    metadata: &MetadataMap,
    operation: &str,
) -> Result<()> {
    let Some(token) = token else {
        return Ok(());
    };
    let presented = metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| metadata.get("token").and_then(|value| value.to_str().ok()));
    match presented {
        None => Err(Error::Unauthenticated(format!(
            "{operation} is an admin operation: send the admin token as `authorization: Bearer <token>`"
        ))),
        Some(presented) if token.matches(presented.trim().as_bytes()) => Ok(()),
        Some(_) => {
            tracing::warn!(operation, "refused an admin request: wrong token");
            Err(Error::Unauthenticated(format!(
                "{operation}: the admin token is wrong"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(key: &'static str, value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(key, value.parse().expect("ascii"));
        metadata
    }

    #[test]
    fn tokens_are_checked() {
        let token = AdminToken::new("correct-horse-battery-staple\n").expect("token");
        assert!(check_admin(None, &MetadataMap::new(), "x").is_ok());
        let missing = check_admin(Some(&token), &MetadataMap::new(), "Tables.Create");
        let status = tonic::Status::from(missing.expect_err("refused"));
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let wrong = metadata("authorization", "Bearer correct-horse-battery-stapler");
        assert!(check_admin(Some(&token), &wrong, "x").is_err());
        let right = metadata("authorization", "Bearer correct-horse-battery-staple");
        assert!(check_admin(Some(&token), &right, "x").is_ok());
        let etcd = metadata("token", "correct-horse-battery-staple");
        assert!(check_admin(Some(&token), &etcd, "x").is_ok());
        assert!(!format!("{token:?}").contains("horse"));
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in the middle").is_err());
    }
}
