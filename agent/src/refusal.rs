//! Start-up refusals: the host is not set up the way the agent needs, or not
//! safely, and the agent can't (or must not) fix that itself.

/// One line saying what is wrong, with the object, its state and what to
/// do. `sluice run` prints it and exits 2, as for a bad config: a restart
/// won't help until someone changes the host.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);
