//! Entering another network namespace (`--netns PATH`) so the iptables programs spawned afterwards
//! change that namespace. `setns` moves only the calling thread, which is all a single-threaded init
//! container (and a test thread) needs.

use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// Moves the calling thread into the network namespace at `path` (e.g. `/var/run/netns/NAME` or
/// `/proc/PID/ns/net`). Processes it spawns afterwards start there.
pub fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|source| Error::NetnsOpen {
        path: path.to_owned(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::NetnsEnter {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
