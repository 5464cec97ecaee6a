//! Time as Keel stores it.

use chrono::{DateTime, SubsecRound, Utc};

/// Now, truncated to microseconds: the precision PostgreSQL keeps, so a time
/// read back compares equal to the one written (keyset cursors rely on it).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}
