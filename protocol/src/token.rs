//! Bearer tokens: JWTs signed with HS256. `sub` is the user id, `exp` the expiry (seconds since
//! the epoch), and an optional `dev` names the device.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UserId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token signature or format invalid")]
    Invalid,
    #[error("token subject is not a valid user id")]
    BadSubject,
    #[error("token device is not a valid device id")]
    BadDevice,
}

impl TokenError {
    /// A short label for metrics (`handshake failures by cause`).
    pub fn cause(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::Expired => "token_expired",
            TokenError::Invalid => "token_invalid",
            TokenError::BadSubject | TokenError::BadDevice => "token_bad_claims",
        }
    }
}

/// The identity a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub device: Option<DeviceId>,
}

/// Signing and verification keys for HS256 tokens.
#[derive(Clone)]
pub struct TokenKeys {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    /// `leeway_s` is the clock skew allowed on `exp`.
    pub fn hs256(secret: &[u8], leeway_s: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        TokenKeys { enc: EncodingKey::from_secret(secret), dec: DecodingKey::from_secret(secret), validation }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let data = decode::<Claims>(token, &self.dec, &self.validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        })?;
        let user = UserId::parse(&data.claims.sub).map_err(|_| TokenError::BadSubject)?;
        let device = match data.claims.dev.as_deref() {
            None => None,
            Some(d) => Some(DeviceId::parse(d).map_err(|_| TokenError::BadDevice)?),
        };
        Ok(Identity { user, device })
    }

    /// Mints a token valid for `ttl_s` seconds (dev mode, tests and loadgen).
    pub fn mint(&self, user: &str, device: Option<&str>, ttl_s: u64) -> String {
        let exp = crate::now_ms() / 1000 + ttl_s;
        self.mint_claims(&Claims { sub: user.to_owned(), exp, dev: device.map(str::to_owned) })
    }

    pub fn mint_claims(&self, claims: &Claims) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &self.enc).expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let keys = TokenKeys::hs256(b"secret", 0);
        let t = keys.mint("alice", Some("phone"), 60);
        let id = keys.verify(&t).unwrap();
        assert_eq!(id.user.as_str(), "alice");
        assert_eq!(id.device.unwrap().as_str(), "phone");

        let other = TokenKeys::hs256(b"other", 0);
        assert_eq!(other.verify(&t), Err(TokenError::Invalid));
        assert_eq!(keys.verify(""), Err(TokenError::Missing));
        assert_eq!(keys.verify("a.b.c"), Err(TokenError::Invalid));

        let expired = keys.mint_claims(&Claims { sub: "alice".into(), exp: 1, dev: None });
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));

        let bad = keys.mint("a.b", None, 60);
        assert_eq!(keys.verify(&bad), Err(TokenError::BadSubject));
    }

    #[test]
    fn leeway_accepts_small_skew() {
        let keys = TokenKeys::hs256(b"s", 120);
        let exp = crate::now_ms() / 1000 - 30;
        let t = keys.mint_claims(&Claims { sub: "a".into(), exp, dev: None });
        assert!(keys.verify(&t).is_ok());
    }
}
