//! The container a process runs in, from its cgroup path (`/proc/PID/cgroup`): Docker and
//! containerd put the 64-hex container id in a path component, as `…/ecs/TASK/ID` (cgroup v1 and
//! v2) or `…/docker-ID.scope` (the systemd driver).

use regex::Regex;

/// Matched against each component of each cgroup path; the first capture group is the id.
pub const DEFAULT_PATTERN: &str =
    r"^(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?$";

#[derive(Debug, thiserror::Error)]
#[error("--xds-attestation-container-pattern: {0}")]
pub struct PatternError(String);

/// Finds container ids in cgroup paths.
#[derive(Debug, Clone)]
pub struct ContainerPattern(Regex);

impl ContainerPattern {
    /// A pattern with exactly one capture group (the id).
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        let re = Regex::new(pattern).map_err(|e| PatternError(e.to_string()))?;
        if re.captures_len() != 2 {
            return Err(PatternError(format!(
                "{pattern:?} must have exactly one capture group (the container id)"
            )));
        }
        Ok(ContainerPattern(re))
    }

    /// The innermost container id in a `/proc/PID/cgroup` text, if any line's path holds one.
    pub fn container_id(&self, cgroup_file: &str) -> Option<String> {
        let mut found = None;
        for line in cgroup_file.lines() {
            // hierarchy-ID:controllers:path (the path may itself hold ':').
            let Some(path) = line.splitn(3, ':').nth(2) else {
                continue;
            };
            for component in path.split('/') {
                if let Some(c) = self.0.captures(component).and_then(|c| c.get(1)) {
                    found = Some(c.as_str().to_string());
                }
            }
        }
        found
    }
}

impl Default for ContainerPattern {
    fn default() -> Self {
        // The constant compiles (a test says so).
        ContainerPattern(Regex::new(DEFAULT_PATTERN).unwrap_or_else(|_| unreachable!()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f5e2d7c0a1b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5";

    #[test]
    fn finds_the_id_in_v1_v2_and_systemd_layouts() {
        let p = ContainerPattern::new(DEFAULT_PATTERN).unwrap();
        let v2 = format!("0::/ecs/0123456789abcdef0123456789abcdef/{ID}\n");
        assert_eq!(p.container_id(&v2).as_deref(), Some(ID));
        let v1 =
            format!("12:pids:/ecs/task-id/{ID}\n11:memory:/ecs/task-id/{ID}\n1:name=systemd:/\n");
        assert_eq!(p.container_id(&v1).as_deref(), Some(ID));
        let systemd = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(p.container_id(&systemd).as_deref(), Some(ID));
    }

    #[test]
    fn a_host_process_or_a_short_id_is_no_container() {
        let p = ContainerPattern::default();
        assert_eq!(
            p.container_id("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(p.container_id("0::/ecs/task/4f5e2d7c0a1b\n"), None);
        // Upper case is not what Docker writes.
        assert_eq!(
            p.container_id(&format!("0::/ecs/t/{}\n", ID.to_uppercase())),
            None
        );
    }

    #[test]
    fn a_custom_pattern_needs_one_capture_group() {
        assert!(ContainerPattern::new("[0-9a-f]{12}").is_err());
        let p = ContainerPattern::new(r"^pod-([0-9a-f]{12})$").unwrap();
        assert_eq!(
            p.container_id("0::/k/pod-4f5e2d7c0a1b\n").as_deref(),
            Some("4f5e2d7c0a1b")
        );
    }
}
