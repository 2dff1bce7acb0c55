//! The proof rule of self-service changes, in one place (the operator guide's "Self-service":
//! what a change needs). A consumer's account is only as strong as its strongest confirmed factor, and a
//! change to its factors must be proved at that level:
//!
//! | confirmed factors | a change needs `X-OTP` with | [`Assurance`] |
//! |---|---|---|
//! | none | nothing (the API key is all there is) | `KeyOnly` |
//! | SMS only | an SMS login code or a recovery code | `Sms` |
//! | TOTP (with or without SMS) | a TOTP code or a recovery code, never an SMS code | `Totp` |
//!
//! "A change" is every self-service call that adds, replaces or removes a factor or the
//! recovery codes: starting a TOTP or SMS enrolment, regenerating recovery codes, removing the
//! number. SMS is a restricted authenticator (NIST SP 800-63B): a SIM swap must not turn an
//! SMS code into a new authenticator app and so into a pass on a policy that excludes SMS.
//! With SMS as the only factor there is nothing stronger to ask for, so its codes prove every
//! change, adding an app included.
//!
//! Recovery codes are as strong as the account they back up: whenever TOTP is confirmed, the
//! set in force was issued by a TOTP confirmation or regenerated with TOTP-level proof.
//!
//! A pending enrolment remembers the level it was started at. It can be confirmed only while
//! the account is still at that level or below (so one started with the key alone, before any
//! factor existed, dies once the owner confirms one), and a confirmation that raises the level
//! drops, in the same store transaction, the pending enrolments started below the new level.

use super::factors::Factors;

/// How strongly a change was (or must be) proved. Ordered: `KeyOnly < Sms < Totp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Assurance {
    /// No confirmed factor: nothing beyond the API key could be asked for.
    KeyOnly,
    /// SMS is the strongest confirmed factor.
    Sms,
    /// TOTP is confirmed.
    Totp,
}

impl Assurance {
    /// The level of an account with these confirmed factors: what a change to it needs.
    pub fn of_account(totp: bool, sms: bool) -> Self {
        if totp {
            Assurance::Totp
        } else if sms {
            Assurance::Sms
        } else {
            Assurance::KeyOnly
        }
    }

    /// The factors whose codes prove a change at this level (nothing for `KeyOnly`).
    pub fn proofs(self) -> Factors {
        Factors {
            totp: self == Assurance::Totp,
            recovery_code: self != Assurance::KeyOnly,
            sms: self == Assurance::Sms,
        }
    }

    /// The level by name, for audit events (`proved_with`).
    pub fn as_str(self) -> &'static str {
        match self {
            Assurance::Totp => "totp",
            Assurance::Sms => "sms",
            Assurance::KeyOnly => "key_only",
        }
    }

    /// `methods="…"` of the `WWW-Authenticate` challenge asking for such a proof.
    pub fn challenge_methods(self) -> &'static str {
        match self {
            Assurance::Totp => "totp recovery_code",
            Assurance::Sms => "recovery_code sms",
            Assurance::KeyOnly => "",
        }
    }

    /// What the consumer must send, in words (for problem details).
    pub fn wanted(self) -> &'static str {
        match self {
            Assurance::Totp => {
                "a current code from the authenticator app or a recovery code (a texted code is \
                 not enough while an authenticator app is set up)"
            }
            Assurance::Sms => "a texted login code (POST sms/send) or a recovery code",
            Assurance::KeyOnly => "nothing",
        }
    }

    /// The stored form.
    pub fn to_db(self) -> i64 {
        match self {
            Assurance::KeyOnly => 0,
            Assurance::Sms => 1,
            Assurance::Totp => 2,
        }
    }

    /// From the stored form; anything unknown is the weakest level (fail closed: such a
    /// pending enrolment is confirmed only on an account without factors).
    pub fn from_db(value: i64) -> Self {
        match value {
            2 => Assurance::Totp,
            1 => Assurance::Sms,
            _ => Assurance::KeyOnly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_as_strong_as_its_strongest_factor() {
        assert_eq!(Assurance::of_account(false, false), Assurance::KeyOnly);
        assert_eq!(Assurance::of_account(false, true), Assurance::Sms);
        assert_eq!(Assurance::of_account(true, false), Assurance::Totp);
        assert_eq!(Assurance::of_account(true, true), Assurance::Totp);
        assert!(Assurance::KeyOnly < Assurance::Sms && Assurance::Sms < Assurance::Totp);
    }

    #[test]
    fn an_sms_code_proves_nothing_on_an_account_with_totp() {
        let totp = Assurance::Totp.proofs();
        assert!(totp.totp && totp.recovery_code && !totp.sms);
        let sms = Assurance::Sms.proofs();
        assert!(sms.sms && sms.recovery_code && !sms.totp);
        assert_eq!(Assurance::KeyOnly.proofs().names(), Vec::<&str>::new());
        assert_eq!(
            Assurance::Totp.challenge_methods(),
            Assurance::Totp.proofs().names().join(" ")
        );
        assert_eq!(
            Assurance::Sms.challenge_methods(),
            Assurance::Sms.proofs().names().join(" ")
        );
    }

    #[test]
    fn stored_levels_round_trip_and_unknown_ones_are_the_weakest() {
        for level in [Assurance::KeyOnly, Assurance::Sms, Assurance::Totp] {
            assert_eq!(Assurance::from_db(level.to_db()), level);
        }
        assert_eq!(Assurance::from_db(7), Assurance::KeyOnly);
        assert_eq!(Assurance::from_db(-1), Assurance::KeyOnly);
    }
}
