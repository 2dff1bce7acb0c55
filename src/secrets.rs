//! Secrets the gateway keeps for itself: the master key (encrypts TOTP secrets, derives the
//! peppers that API keys and recovery codes are hashed with) and the admin token. Both come
//! from the environment or are created in the data directory, readable by the owner only.

use std::collections::HashMap;
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, KeyInit as HmacKeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const MASTER_KEY_ENV: &str = "STEPGATE_MASTER_KEY";
pub const ADMIN_TOKEN_ENV: &str = "STEPGATE_ADMIN_TOKEN";
const MASTER_KEY_FILE: &str = "master.key";
const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{0}")]
    Io(String),
    #[error("{0} must be 64 hex characters (32 bytes); generate one with `openssl rand -hex 32`")]
    BadMasterKey(&'static str),
    #[error("{path} is open to other users (mode {mode:o}); run `chmod 600 {path}`")]
    LoosePermissions { path: String, mode: u32 },
    #[error(
        "{path} belongs to another user (uid {owner}); it must be owned by the user stepgate \
         runs as (uid {me})"
    )]
    NotOwned { path: String, owner: u32, me: u32 },
}

/// 32 random bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS generator failing is not something a gateway can run without.
    getrandom::fill(&mut bytes).unwrap_or_else(|e| panic!("OS random generator failed: {e}"));
    bytes
}

/// A map keyed by 32-byte digests (HMACs of API keys, SHA-256 of step-up tokens). The keys
/// are uniformly distributed already, so 8 of their bytes are the hash (bytes 8..16: the first
/// byte picks a step-up token's shard, so it must not also pick its bucket): hashing them
/// again (SipHash, the default) would cost more than the lookup. Flooding is not a concern:
/// entries are only ever made by the gateway (an attacker cannot choose a key's HMAC without
/// the pepper, nor insert a token), and looking up absent keys cannot lengthen a probe.
pub type DigestMap<V> = HashMap<[u8; 32], V, BuildHasherDefault<DigestHasher>>;

#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let part = bytes.get(8..16).unwrap_or(bytes);
        let n = part.len().min(8);
        word[..n].copy_from_slice(&part[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _length_prefix: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The `N` bytes spelt by exactly `2N` lowercase hex digits (step-up tokens), else `None`.
/// Decoding checks the digits too, so a token is read in one pass.
pub fn unhex_lower<const N: usize>(text: &str) -> Option<[u8; N]> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// The master key and what is derived from it.
pub struct MasterKey {
    cipher: Aes256Gcm,
    api_key_pepper: Hmac<Sha256>,
    recovery_pepper: Hmac<Sha256>,
    sms_pepper: Hmac<Sha256>,
}

impl MasterKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let derive = |label: &[u8]| {
            let mut mac = <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&key)
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
            mac.update(label);
            let pepper = mac.finalize().into_bytes();
            <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&pepper)
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
        };
        Self {
            cipher: Aes256Gcm::new(&key.into()),
            api_key_pepper: derive(b"stepgate/api-key-pepper/v1"),
            recovery_pepper: derive(b"stepgate/recovery-code-pepper/v1"),
            sms_pepper: derive(b"stepgate/sms-code-pepper/v1"),
        }
    }

    /// From `STEPGATE_MASTER_KEY`, else `<data_dir>/master.key`, created (mode 0600) when absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretsError> {
        Self::from_env().unwrap_or_else(|| {
            let path = data_dir.join(MASTER_KEY_FILE);
            Self::from_text(&read_or_create_private(&path, "master key", || {
                hex(&random_bytes::<32>())
            })?)
        })
    }

    /// From `STEPGATE_MASTER_KEY`, else `<data_dir>/master.key`; never created (for tools that
    /// read data a gateway sealed).
    pub fn load(data_dir: &Path) -> Result<Self, SecretsError> {
        Self::from_env()
            .unwrap_or_else(|| Self::from_text(&read_private(&data_dir.join(MASTER_KEY_FILE))?))
    }

    fn from_env() -> Option<Result<Self, SecretsError>> {
        let value = std::env::var(MASTER_KEY_ENV).ok()?;
        Some(
            unhex::<32>(&value)
                .map(Self::from_bytes)
                .ok_or(SecretsError::BadMasterKey(MASTER_KEY_ENV)),
        )
    }

    fn from_text(text: &str) -> Result<Self, SecretsError> {
        unhex::<32>(text)
            .map(Self::from_bytes)
            .ok_or(SecretsError::BadMasterKey("the master key file"))
    }

    /// HMAC-SHA256 of an API key under the API-key pepper.
    pub fn hash_api_key(&self, key: &str) -> [u8; 32] {
        let mut mac = self.api_key_pepper.clone();
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of a normalised recovery code under the recovery pepper.
    pub fn hash_recovery_code(&self, code: &str) -> [u8; 32] {
        let mut mac = self.recovery_pepper.clone();
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of an SMS code under the SMS pepper, bound to its consumer and purpose. A
    /// six-digit code has only a million values, so its hash is worth nothing without the
    /// pepper, which never leaves memory (it is derived from the master key).
    pub fn hash_sms_code(&self, consumer_id: &str, purpose: &str, code: &str) -> [u8; 32] {
        let mut mac = self.sms_pepper.clone();
        for part in [consumer_id, purpose, code] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac.finalize().into_bytes().into()
    }

    /// AES-256-GCM with a random 96-bit nonce; `context` (e.g. the consumer id) is bound as
    /// associated data, so a ciphertext moved to another row fails to decrypt.
    pub fn encrypt(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let nonce_bytes = random_bytes::<12>();
        let nonce = Nonce::from(nonce_bytes);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .unwrap_or_else(|_| unreachable!("AES-GCM encryption of a short message cannot fail"));
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        out
    }

    /// `None` when the data was not sealed with this key and context.
    pub fn decrypt(&self, sealed: &[u8], context: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .ok()
    }
}

/// The admin API's bearer token.
pub struct AdminToken(String);

impl AdminToken {
    /// From `STEPGATE_ADMIN_TOKEN`, else `<data_dir>/admin.token`, created (mode 0600) when absent.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretsError> {
        if let Ok(value) = std::env::var(ADMIN_TOKEN_ENV) {
            let value = value.trim().to_owned();
            if value.len() < 16 {
                return Err(SecretsError::Io(format!(
                    "{ADMIN_TOKEN_ENV} must be at least 16 characters"
                )));
            }
            return Ok(Self(value));
        }
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let text = read_or_create_private(&path, "admin token", || {
            format!("sga_{}", hex(&random_bytes::<32>()))
        })?;
        Ok(Self(text.trim().to_owned()))
    }

    pub fn new(token: String) -> Self {
        Self(token)
    }

    /// Constant-time comparison with a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Where the admin token lives for a data dir (the CLI reads it from there).
pub fn admin_token_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

/// Reads a secret file (the master key, the admin token, an SMS provider's auth token):
/// refused when anyone but its owner could read or change it, when it belongs to another
/// user, or when it is not a small, non-empty regular file. Returned trimmed.
pub fn read_private(path: &Path) -> Result<String, SecretsError> {
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    read_opened_private(file, path)
}

/// Reads a secret file as [`read_private`] does; creates it with mode 0600 when it does not
/// exist (never overwriting one that appeared meanwhile).
/// A file created is logged by its path (never its contents), so that an operator learns
/// where the gateway put a secret it generated.
fn read_or_create_private(
    path: &Path,
    what: &str,
    make: impl FnOnce() -> String,
) -> Result<String, SecretsError> {
    let io = |e: std::io::Error| io_error(path, e);
    match fs::File::open(path) {
        Ok(file) => read_opened_private(file, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io)?;
            }
            let value = make();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(format!("{value}\n").as_bytes())
                .map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), "generated the {what} (mode 0600)");
            Ok(value)
        }
        Err(e) => Err(io(e)),
    }
}

fn io_error(path: &Path, error: std::io::Error) -> SecretsError {
    SecretsError::Io(format!("{}: {error}", path.display()))
}

/// The checks of [`read_private`], made on the opened file (fstat), not on the path before
/// reading it, so a file swapped in between cannot slip past them.
fn read_opened_private(file: fs::File, path: &Path) -> Result<String, SecretsError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display().to_string();
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(SecretsError::Io(format!("{shown} is not a regular file")));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::LoosePermissions { path: shown, mode });
    }
    if let Some(me) = current_uid()
        && meta.uid() != me
    {
        return Err(SecretsError::NotOwned {
            path: shown,
            owner: meta.uid(),
            me,
        });
    }
    // A key or token is a few dozen bytes: a larger file is not one (and is not read whole).
    const LIMIT: u64 = 4096;
    let mut text = String::new();
    file.take(LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(|e| io_error(path, e))?;
    if text.len() as u64 > LIMIT {
        return Err(SecretsError::Io(format!(
            "{shown} is over {LIMIT} bytes: not a key or token"
        )));
    }
    let value = text.trim();
    if value.is_empty() {
        return Err(SecretsError::Io(format!("{shown} is empty")));
    }
    Ok(value.to_owned())
}

/// The effective uid of this process, without `unsafe`: Linux's procfs gives `/proc/self` the
/// process's effective uid. `None` elsewhere, where only the mode is checked.
fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    if cfg!(target_os = "linux") {
        fs::metadata("/proc/self").ok().map(|m| m.uid())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_data_needs_the_same_key_and_context() {
        let key = MasterKey::from_bytes([7; 32]);
        let sealed = key.encrypt(b"JBSWY3DPEHPK3PXP", b"consumer-1");
        assert_eq!(
            key.decrypt(&sealed, b"consumer-1").as_deref(),
            Some(&b"JBSWY3DPEHPK3PXP"[..])
        );
        assert_eq!(key.decrypt(&sealed, b"consumer-2"), None);
        assert_eq!(
            MasterKey::from_bytes([8; 32]).decrypt(&sealed, b"consumer-1"),
            None
        );
    }

    #[test]
    fn lowercase_hex_decodes_and_anything_else_is_refused() {
        assert_eq!(unhex_lower::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(hex(&unhex_lower::<3>("09afbe").unwrap()), "09afbe");
        for bad in ["0AFF", "0af", "0affe", "0ag0", "0a f", "+0ff", ""] {
            assert_eq!(unhex_lower::<2>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn peppers_differ_per_purpose() {
        let key = MasterKey::from_bytes([7; 32]);
        assert_ne!(key.hash_api_key("x"), key.hash_recovery_code("x"));
        assert_ne!(
            key.hash_sms_code("c1", "login", "123456"),
            key.hash_sms_code("c2", "login", "123456")
        );
        assert_ne!(
            key.hash_sms_code("c1", "login", "123456"),
            key.hash_sms_code("c1", "enrol", "123456")
        );
        assert_eq!(key.hash_api_key("x"), key.hash_api_key("x"));
        assert_ne!(
            key.hash_api_key("x"),
            MasterKey::from_bytes([8; 32]).hash_api_key("x")
        );
    }

    /// An empty admin token file would make the empty string the admin token.
    #[test]
    fn an_empty_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        fs::write(&path, "\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        match AdminToken::load_or_create(dir.path()) {
            Err(SecretsError::Io(message)) => assert!(message.ends_with("is empty"), "{message}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("an empty admin token was accepted"),
        }
    }

    #[test]
    fn secret_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = MasterKey::load_or_create(dir.path())
            .map(|k| k.hash_api_key("k"))
            .unwrap();
        let mode = fs::metadata(dir.path().join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = MasterKey::load_or_create(dir.path())
            .map(|k| k.hash_api_key("k"))
            .unwrap();
        assert_eq!(first, again);
        fs::set_permissions(
            dir.path().join("master.key"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            MasterKey::load_or_create(dir.path()),
            Err(SecretsError::LoosePermissions { .. })
        ));
    }
}
