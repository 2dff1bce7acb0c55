//! TOTP (RFC 6238) through totp-rs: parameters, enrolment material (secret, `otpauth://` URI,
//! QR code) and verification. Verification takes `now` and returns the matched time step;
//! replay protection (a step is accepted once) is the caller's, against the stored watermark.

use qrcode::QrCode;
use qrcode::render::{svg, unicode};
use serde::{Deserialize, Serialize};
use totp_rs::{Algorithm, Secret, Totp};

use crate::secrets::random_bytes;

pub const ISSUER: &str = "stepgate";

/// Per-consumer TOTP parameters; the defaults are what every authenticator app supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotpParams {
    pub algorithm: TotpAlgorithm,
    pub digits: u8,
    pub period: u64,
}

impl Default for TotpParams {
    fn default() -> Self {
        Self {
            algorithm: TotpAlgorithm::Sha1,
            digits: 6,
            period: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TotpAlgorithm {
    #[serde(alias = "sha1")]
    Sha1,
    #[serde(alias = "sha256")]
    Sha256,
    #[serde(alias = "sha512")]
    Sha512,
}

impl TotpAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            TotpAlgorithm::Sha1 => "SHA1",
            TotpAlgorithm::Sha256 => "SHA256",
            TotpAlgorithm::Sha512 => "SHA512",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Self::Sha1),
            "SHA256" => Some(Self::Sha256),
            "SHA512" => Some(Self::Sha512),
            _ => None,
        }
    }

    fn to_totp_rs(self) -> Algorithm {
        match self {
            TotpAlgorithm::Sha1 => Algorithm::SHA1,
            TotpAlgorithm::Sha256 => Algorithm::SHA256,
            TotpAlgorithm::Sha512 => Algorithm::SHA512,
        }
    }
}

impl TotpParams {
    /// RFC 4226 allows 6 to 8 digits; periods outside 15–120 s are refused as mistakes.
    pub fn validate(&self) -> Result<(), String> {
        if !(6..=8).contains(&self.digits) {
            return Err("digits must be 6, 7 or 8".into());
        }
        if !(15..=120).contains(&self.period) {
            return Err("period must be between 15 and 120 seconds".into());
        }
        Ok(())
    }
}

/// A fresh 160-bit secret from the OS CSPRNG.
pub fn new_secret() -> [u8; 20] {
    random_bytes::<20>()
}

/// The totp-rs generator for a secret, with ±1 step of skew.
pub fn generator(secret: &[u8], params: TotpParams, account: &str) -> Result<Totp, String> {
    totp_rs::Builder::new()
        .with_algorithm(params.algorithm.to_totp_rs())
        .with_digits(params.digits)
        .with_step_duration(params.period)
        .with_skew(1)
        .with_secret(Secret::from(secret.to_vec()))
        .with_issuer(Some(ISSUER))
        .with_account_name(account)
        .build()
        .map_err(|e| e.to_string())
}

/// What an enrolling consumer needs: the base32 secret, the URI and its QR code.
pub struct Enrolment {
    pub secret_base32: String,
    pub otpauth_uri: String,
    pub qr_svg: String,
}

pub fn enrolment(secret: &[u8], params: TotpParams, account: &str) -> Result<Enrolment, String> {
    let totp = generator(secret, params, account)?;
    let uri = totp.to_url().map_err(|e| e.to_string())?;
    Ok(Enrolment {
        secret_base32: Secret::from(secret.to_vec()).to_base32(),
        qr_svg: qr_svg(&uri)?,
        otpauth_uri: uri,
    })
}

pub fn qr_svg(text: &str) -> Result<String, String> {
    let code = QrCode::new(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(code
        .render::<svg::Color<'_>>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build())
}

/// The QR code drawn with Unicode half blocks, for a terminal.
pub fn qr_terminal(text: &str) -> Result<String, String> {
    let code = QrCode::new(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(code
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Is `code` exactly `digits` ASCII digits? (Unicode digits, signs and spaces are not.)
pub fn is_code_shape(code: &str, digits: u8) -> bool {
    code.len() == usize::from(digits) && code.bytes().all(|b| b.is_ascii_digit())
}

/// The time step `code` matches at `now` (±1 step), compared in constant time by totp-rs.
pub fn verify(totp: &Totp, code: &str, now: u64) -> Option<u64> {
    if !is_code_shape(code, totp.digits()) {
        return None;
    }
    totp.check(code, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1, 8 digits, secret "12345678901234567890".
    #[test]
    fn rfc6238_vectors() {
        let params = TotpParams {
            algorithm: TotpAlgorithm::Sha1,
            digits: 8,
            period: 30,
        };
        let totp = generator(b"12345678901234567890", params, "alice").unwrap();
        for (time, code) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
        ] {
            assert_eq!(verify(&totp, code, time), Some(time / 30), "{time}");
        }
        // ±1 step accepted, ±2 refused.
        assert_eq!(
            verify(&totp, "07081804", 1_111_111_109 + 30),
            Some(1_111_111_109 / 30)
        );
        assert_eq!(verify(&totp, "07081804", 1_111_111_109 + 60), None);
        assert_eq!(verify(&totp, "0708180", 1_111_111_109), None);
        assert_eq!(verify(&totp, "０７０８１８０４", 1_111_111_109), None);
    }

    #[test]
    fn uri_names_issuer_and_account() {
        let e = enrolment(&[1; 20], TotpParams::default(), "alice").unwrap();
        assert!(
            e.otpauth_uri.starts_with("otpauth://totp/stepgate:alice?"),
            "{}",
            e.otpauth_uri
        );
        assert!(e.otpauth_uri.contains("issuer=stepgate"));
        assert!(
            e.otpauth_uri
                .contains(&format!("secret={}", e.secret_base32))
        );
        assert!(e.qr_svg.starts_with("<?xml") || e.qr_svg.starts_with("<svg"));
        assert_eq!(e.secret_base32.len(), 32);
    }
}
