//! Credential checks on the request path, in the order the stack applies them: client
//! address, failure limiter, API key (first factor), consumer ban, roles, second factor.

pub mod api_key;
pub mod client_ip;
pub mod failures;
pub mod roles;
pub mod second_factor;

#[cfg(test)]
mod tests;
