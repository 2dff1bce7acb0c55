//! Every header the gateway reads as a credential or writes as a fact it vouches for, and
//! the one rule that says which names a client may never send in any spelling. A leaf: the
//! layers that read or write these headers import their names from here.

use http::HeaderName;

// Credentials a client presents.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_OTP: HeaderName = HeaderName::from_static("x-otp");
pub static X_STEP_UP_TOKEN: HeaderName = HeaderName::from_static("x-step-up-token");
/// The id of a request a person approved, presented with its repeat.
pub static X_APPROVAL: HeaderName = HeaderName::from_static("x-approval");

// Identity the gateway vouches for to upstreams.
pub static X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
pub static X_CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub static X_CONSUMER_ROLES: HeaderName = HeaderName::from_static("x-consumer-roles");
pub static X_STEPGATE_AUTH: HeaderName = HeaderName::from_static("x-stepgate-auth");
/// To the upstream: when the last second factor was presented (RFC 3339), for a request that
/// passed with a code or a step-up token.
pub static X_STEPGATE_AUTH_TIME: HeaderName = HeaderName::from_static("x-stepgate-auth-time");

// Facts about the connection the gateway vouches for to upstreams.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

// Answers to the client.
pub static X_STEP_UP_EXPIRES: HeaderName = HeaderName::from_static("x-step-up-expires");
pub static X_STEPGATE_WARNING: HeaderName = HeaderName::from_static("x-stepgate-warning");

/// Is `name` (lower case, `-` separated) one of the gateway's identity headers? A client's
/// copies are removed: only the gateway sets them.
pub fn is_identity(name: &str) -> bool {
    name.starts_with("x-consumer-") || name.starts_with("x-stepgate-")
}

/// Is `name` (lower case, `-` separated) a credential the gateway reads?
pub fn is_gateway_credential(name: &str) -> bool {
    matches!(
        name,
        "x-api-key" | "x-otp" | "x-step-up-token" | "x-approval"
    )
}

/// Is `name` (lower case, `-` separated) a fact about the connection that the gateway
/// replaces with its own (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`, `X-Request-Id`)?
pub fn is_connection_fact(name: &str) -> bool {
    name.starts_with("x-forwarded-") || matches!(name, "x-real-ip" | "forwarded" | "x-request-id")
}

/// A name no client may send in another spelling: credentials, identity and connection
/// facts. CGI, WSGI, PHP and Rack upstreams read `X_Consumer_Name` as the same variable
/// (`HTTP_X_CONSUMER_NAME`) as `X-Consumer-Name`, so the look-alike would pass for the real
/// header behind the gateway's back.
pub fn is_protected(name: &str) -> bool {
    is_identity(name) || is_gateway_credential(name) || is_connection_fact(name)
}

/// `name` as CGI-style upstreams see it: `_` read as `-` (lower case already).
pub fn cgi_spelling(name: &str) -> String {
    name.replace('_', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_names_are_credentials_identity_and_connection_facts() {
        for name in [
            "x-api-key",
            "x-otp",
            "x-step-up-token",
            "x-consumer-name",
            "x-consumer-anything",
            "x-stepgate-auth",
            "x-forwarded-for",
            "x-forwarded-prefix",
            "x-real-ip",
            "forwarded",
            "x-request-id",
        ] {
            assert!(is_protected(name), "{name}");
        }
        for name in ["x-apikey", "x-consumer", "accept", "x-otp-hint"] {
            assert!(!is_protected(name), "{name}");
        }
        assert!(is_protected(&cgi_spelling("x_consumer_name")));
    }
}
