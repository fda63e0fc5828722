//! Placeholder until the destination lands; see its issue.
