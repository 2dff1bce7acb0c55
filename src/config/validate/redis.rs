//! The `store: { redis: {...} }` section: the URL (`redis://` or `rediss://`, never with a
//! password in it), the password from the environment or an owner-only file, timeouts and
//! the staleness bound.

use std::time::Duration;

use serde_saphyr::Spanned;

use super::Loader;
use crate::config::{RedisSettings, StoreSettings, raw};

const MIN_STALE_FOR: Duration = Duration::from_millis(250);
const MAX_STALE_FOR: Duration = Duration::from_secs(60);

impl Loader<'_> {
    pub(super) fn redis(&mut self, spec: &Spanned<raw::Redis>) -> Option<StoreSettings> {
        let r = &spec.value;
        let url = r.url.value.trim();
        let mut ok = true;
        let rest = match url
            .strip_prefix("redis://")
            .or_else(|| url.strip_prefix("rediss://"))
        {
            Some(rest) => rest,
            None => {
                self.at(
                    &r.url.referenced,
                    format!("store.redis.url: `{url}` must start with redis:// or rediss://"),
                );
                return None;
            }
        };
        // user:password@ or :password@ before the host: the password would sit in the file.
        if let Some((userinfo, _)) = rest.split_once('@')
            && userinfo.contains(':')
        {
            self.at(
                &r.url.referenced,
                "store.redis.url: no password in the URL; use password_env or password_file",
            );
            ok = false;
        }
        let password = match (&r.password_env, &r.password_file) {
            (None, None) => None,
            (Some(var), None) => match std::env::var(&var.value) {
                Ok(value) if !value.trim().is_empty() => Some(value.trim().to_owned()),
                _ => {
                    self.at(
                        &var.referenced,
                        format!(
                            "store.redis.password_env: the environment variable `{}` is not set \
                             (or empty)",
                            var.value
                        ),
                    );
                    ok = false;
                    None
                }
            },
            (None, Some(file)) => {
                let path = self.base.join(&file.value);
                self.hash_file(&path);
                match crate::secrets::read_private(&path) {
                    Ok(password) => Some(password),
                    Err(message) => {
                        self.at(
                            &file.referenced,
                            format!("store.redis.password_file: {message}"),
                        );
                        ok = false;
                        None
                    }
                }
            }
            (Some(var), Some(_)) => {
                self.at(
                    &var.referenced,
                    "store.redis: password_env or password_file, not both",
                );
                ok = false;
                None
            }
        };
        let key_prefix = match &r.key_prefix {
            None => RedisSettings::DEFAULT_PREFIX.to_owned(),
            Some(p)
                if !p.value.is_empty()
                    && p.value.len() <= 64
                    && p.value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b)) =>
            {
                p.value.clone()
            }
            Some(p) => {
                self.at(
                    &p.referenced,
                    "store.redis.key_prefix: 1-64 letters, digits, `-`, `_`, `:` or `.` (no braces: \
                     they would change which keys share a slot)",
                );
                ok = false;
                String::new()
            }
        };
        let connect_timeout = self.duration_or(
            "store.redis.connect_timeout",
            &r.connect_timeout,
            RedisSettings::DEFAULT_CONNECT_TIMEOUT,
        );
        let command_timeout = self.duration_or(
            "store.redis.command_timeout",
            &r.command_timeout,
            RedisSettings::DEFAULT_COMMAND_TIMEOUT,
        );
        let stale_for = self.duration_or(
            "store.redis.stale_for",
            &r.stale_for,
            RedisSettings::DEFAULT_STALE_FOR,
        );
        // Heartbeats come a few times within the bound: below a quarter second a busy node
        // would flap; beyond a minute a revocation could go unheard for that long.
        if let Some(spec) = &r.stale_for
            && !(MIN_STALE_FOR..=MAX_STALE_FOR).contains(&stale_for)
        {
            self.at(
                &spec.referenced,
                "store.redis.stale_for: between 250ms and 60s (default 5s)",
            );
            ok = false;
        }
        ok.then(|| {
            StoreSettings::Redis(RedisSettings {
                url: url.to_owned(),
                key_prefix,
                password,
                connect_timeout,
                command_timeout,
                stale_for,
            })
        })
    }
}
