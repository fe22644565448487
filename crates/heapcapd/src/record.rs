//! What the holder keeps for a container, so the next heapcapd enforces what this one did: its
//! settings and the quotas set for single processes. Its JSON is read by heapcapds of other
//! versions (an upgrade hands the listeners over), so its fields stay as they are.

use heapcap_policy::ledger::{Ledger, Limits, Mode};
use heapcap_policy::settings::Settings;

/// A container's record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    limit: Option<u64>,
    total_limit: Option<u64>,
    audit: bool,
    /// Quotas set for single processes (`heapcap set-limit --pid`).
    #[serde(default)]
    pub process_limits: Vec<(u32, Option<u64>)>,
}

impl Record {
    pub fn new(settings: &Settings) -> Record {
        Record {
            limit: settings.limits.process,
            total_limit: settings.limits.total,
            audit: settings.mode == Mode::Audit,
            process_limits: Vec::new(),
        }
    }

    /// What the ledger holds now.
    pub fn of(ledger: &Ledger) -> Record {
        let limits = ledger.limits();
        let mut record = Record::new(&Settings { limits, mode: ledger.mode() });
        record.process_limits =
            ledger.summaries().into_iter().filter(|p| p.limit != limits.process).map(|p| (p.pid, p.limit)).collect();
        record
    }

    /// A record that could not be read: the container is served unquota'd in audit mode (never
    /// dropped: its programs would fail).
    pub fn unreadable() -> Record {
        Record { limit: None, total_limit: None, audit: true, process_limits: Vec::new() }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits { process: self.limit, total: self.total_limit },
            mode: if self.audit { Mode::Audit } else { Mode::Enforce },
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_of_earlier_heapcapds_still_reads() {
        let old: Record =
            serde_json::from_value(serde_json::json!({"limit": 67108864, "total_limit": null, "audit": false}))
                .expect("a record without process limits");
        assert_eq!(old.settings().limits.process, Some(64 << 20));
        let mut ledger = Ledger::new(old.settings().limits, Mode::Audit, 4096);
        ledger.set_limits(Limits { process: None, total: Some(1 << 30) });
        let now = Record::of(&ledger);
        assert_eq!(
            now.to_json(),
            serde_json::json!({"limit": null, "total_limit": 1073741824, "audit": true, "process_limits": []})
        );
    }
}
