//! Bearer tokens: JWTs signed with HS256 (a shared secret) by default, or verified with a public
//! key (RS256, ES256 or EdDSA) so that the gateway never holds a signing key. `sub` is the user
//! id, `exp` the expiry (seconds since the epoch), `iat` when it was issued (sessions issued
//! before a revocation are refused), and an optional `dev` names the device.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UserId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
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
    /// `iat`, seconds since the epoch; 0 when the token has none.
    pub issued_at: u64,
}

/// The public-key algorithms a gateway can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKeyAlg {
    Rs256,
    Es256,
    EdDsa,
}

impl std::str::FromStr for PublicKeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "RS256" => Ok(PublicKeyAlg::Rs256),
            "ES256" => Ok(PublicKeyAlg::Es256),
            "EDDSA" => Ok(PublicKeyAlg::EdDsa),
            other => Err(format!("unsupported token algorithm {other} (RS256, ES256 or EdDSA)")),
        }
    }
}

/// Verification keys, and the signing key when the gateway may mint (HS256 only).
#[derive(Clone)]
pub struct TokenKeys {
    enc: Option<EncodingKey>,
    dec: DecodingKey,
    validation: Validation,
}

fn validation(alg: Algorithm, leeway_s: u64) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway_s;
    v.validate_exp = true;
    v.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
    v
}

impl TokenKeys {
    /// `leeway_s` is the clock skew allowed on `exp`.
    pub fn hs256(secret: &[u8], leeway_s: u64) -> Self {
        TokenKeys {
            enc: Some(EncodingKey::from_secret(secret)),
            dec: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256, leeway_s),
        }
    }

    /// Verification only, with a PEM public key.
    pub fn public_key(alg: PublicKeyAlg, pem: &[u8], leeway_s: u64) -> Result<Self, String> {
        let (dec, alg) = match alg {
            PublicKeyAlg::Rs256 => (DecodingKey::from_rsa_pem(pem), Algorithm::RS256),
            PublicKeyAlg::Es256 => (DecodingKey::from_ec_pem(pem), Algorithm::ES256),
            PublicKeyAlg::EdDsa => (DecodingKey::from_ed_pem(pem), Algorithm::EdDSA),
        };
        let dec = dec.map_err(|e| format!("reading the token public key: {e}"))?;
        Ok(TokenKeys { enc: None, dec, validation: validation(alg, leeway_s) })
    }

    /// Whether these keys can mint tokens (the dev token endpoint needs it).
    pub fn can_mint(&self) -> bool {
        self.enc.is_some()
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
        Ok(Identity { user, device, issued_at: data.claims.iat.unwrap_or(0) })
    }

    /// Mints a token valid for `ttl_s` seconds (dev mode, tests and loadgen).
    pub fn mint(&self, user: &str, device: Option<&str>, ttl_s: u64) -> String {
        let now = crate::now_ms() / 1000;
        self.mint_claims(&Claims {
            sub: user.to_owned(),
            exp: now + ttl_s,
            iat: Some(now),
            dev: device.map(str::to_owned),
        })
    }

    /// Panics on verification-only keys: callers check [`TokenKeys::can_mint`] first.
    pub fn mint_claims(&self, claims: &Claims) -> String {
        let enc = self.enc.as_ref().expect("minting needs an HS256 secret");
        encode(&Header::new(Algorithm::HS256), claims, enc).expect("HS256 signing cannot fail")
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

        let expired = keys.mint_claims(&Claims { sub: "alice".into(), exp: 1, iat: None, dev: None });
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));

        let bad = keys.mint("a.b", None, 60);
        assert_eq!(keys.verify(&bad), Err(TokenError::BadSubject));
    }

    #[test]
    fn issued_at_is_reported() {
        let keys = TokenKeys::hs256(b"secret", 0);
        let id = keys.verify(&keys.mint("a", None, 60)).unwrap();
        assert!(id.issued_at > 1_600_000_000);
        assert!(keys.can_mint());
    }

    #[test]
    fn public_keys_verify_and_refuse() {
        assert!("eddsa".parse::<PublicKeyAlg>().is_ok());
        assert!("none".parse::<PublicKeyAlg>().is_err());
        assert!(TokenKeys::public_key(PublicKeyAlg::EdDsa, b"not a pem", 0).is_err());
        // An Ed25519 public key (RFC 8410 example).
        let pem = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let keys = TokenKeys::public_key(PublicKeyAlg::EdDsa, pem, 0).unwrap();
        assert!(!keys.can_mint());
        let hs = TokenKeys::hs256(b"secret", 0).mint("a", None, 60);
        assert_eq!(keys.verify(&hs), Err(TokenError::Invalid), "an HS256 token is refused by a public-key gateway");
    }

    #[test]
    fn leeway_accepts_small_skew() {
        let keys = TokenKeys::hs256(b"s", 120);
        let exp = crate::now_ms() / 1000 - 30;
        let t = keys.mint_claims(&Claims { sub: "a".into(), exp, iat: None, dev: None });
        assert!(keys.verify(&t).is_ok());
    }
}
