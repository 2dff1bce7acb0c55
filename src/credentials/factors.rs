//! The second factors by name: the set a policy accepts ([`Factors`]), the one a code proved
//! ([`Factor`]), and what an SMS code is for ([`Purpose`]).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factors {
    pub totp: bool,
    pub recovery_code: bool,
    /// Only with SMS configured (`gateway.yaml` `sms:`); validation refuses it otherwise.
    pub sms: bool,
}

impl Factors {
    /// Every factor (the self-service API accepts whichever the consumer has).
    pub const ALL: Factors = Factors {
        totp: true,
        recovery_code: true,
        sms: true,
    };

    /// The accepted factors' names, in the order the `WWW-Authenticate` challenge lists them.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::with_capacity(3);
        if self.totp {
            names.push("totp");
        }
        if self.recovery_code {
            names.push("recovery_code");
        }
        if self.sms {
            names.push("sms");
        }
        names
    }
}

/// The second factor a code proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    Totp,
    RecoveryCode,
    Sms,
}

impl Factor {
    pub fn as_str(self) -> &'static str {
        match self {
            Factor::Totp => "totp",
            Factor::RecoveryCode => "recovery_code",
            Factor::Sms => "sms",
        }
    }

    /// The `X-Stepgate-Auth` value of a request that proved this factor.
    pub fn auth_method(self) -> &'static str {
        match self {
            Factor::Totp => "key+totp",
            Factor::RecoveryCode => "key+recovery_code",
            Factor::Sms => "key+sms",
        }
    }
}

/// What a code is for. A verification code goes to a number not yet proven to be the
/// consumer's, so it is never accepted as a login code (and the other way round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Sent by `POST {prefix}/sms/send` to the confirmed number: a second factor.
    Login,
    /// Sent by `POST {prefix}/2fa/sms` to a new number: proves the consumer holds it.
    Enrol,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Login => "login",
            Purpose::Enrol => "enrol",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "login" => Some(Purpose::Login),
            "enrol" => Some(Purpose::Enrol),
            _ => None,
        }
    }
}
