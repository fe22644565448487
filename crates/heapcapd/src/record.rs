//! What the holder keeps for a container, so the next heapcapd enforces what this one did: its
//! settings, the quotas set for single processes and its Kubernetes names. Its JSON is read by heapcapds of other
//! versions (an upgrade hands the listeners over), so its fields stay as they are.

use heapcap_control::Pod;
use heapcap_policy::ledger::{Counting, Ledger, Limits, Mode};
use heapcap_policy::machine::MachineMemory;
use heapcap_policy::settings::Settings;

/// A container's record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    limit: Option<u64>,
    total_limit: Option<u64>,
    audit: bool,
    /// Strict counting (absent from earlier heapcapds' records: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    strict: bool,
    /// Quotas set for single processes (`heapcap set-limit --pid`).
    #[serde(default)]
    pub process_limits: Vec<(u32, Option<u64>)>,
    /// The container's Kubernetes names (absent from earlier heapcapds' records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
    /// `heapcap.io/machine-memory: host`: `sysinfo` is left to the kernel even where the profile
    /// sends it (absent, as false, from earlier heapcapds' records).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    host_memory: bool,
}

impl Record {
    pub fn new(settings: &Settings, pod: Option<Pod>) -> Record {
        Record {
            limit: settings.limits.process,
            total_limit: settings.limits.total,
            audit: settings.mode == Mode::Audit,
            strict: settings.counting == Counting::Strict,
            process_limits: Vec::new(),
            pod,
            host_memory: settings.machine == MachineMemory::Host,
        }
    }

    /// What the ledger holds now, for the container named `pod` whose programs see `machine`.
    pub fn of(ledger: &Ledger, pod: Option<Pod>, machine: MachineMemory) -> Record {
        let limits = ledger.limits();
        let settings = Settings { limits, mode: ledger.mode(), counting: ledger.counting(), machine };
        let mut record = Record::new(&settings, pod);
        record.process_limits =
            ledger.summaries().into_iter().filter(|p| p.limit != limits.process).map(|p| (p.pid, p.limit)).collect();
        record
    }

    /// A record that could not be read: the container is served unquota'd in audit mode (never
    /// dropped: its programs would fail).
    pub fn unreadable() -> Record {
        Record {
            limit: None,
            total_limit: None,
            audit: true,
            strict: false,
            process_limits: Vec::new(),
            pod: None,
            host_memory: false,
        }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            limits: Limits { process: self.limit, total: self.total_limit },
            mode: if self.audit { Mode::Audit } else { Mode::Enforce },
            counting: Counting::from_strict(self.strict),
            machine: if self.host_memory { MachineMemory::Host } else { MachineMemory::Quota },
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
        assert_eq!(old.settings().counting, Counting::Heap, "earlier records are never strict");
        let mut ledger = Ledger::new(old.settings().limits, Mode::Audit, 4096);
        ledger.set_limits(Limits { process: None, total: Some(1 << 30) });
        let now = Record::of(&ledger, None, MachineMemory::Quota);
        assert_eq!(
            now.to_json(),
            serde_json::json!({"limit": null, "total_limit": 1073741824, "audit": true, "process_limits": []})
        );
    }

    #[test]
    fn the_host_memory_opt_out_travels_to_the_next_heapcapd() {
        let host = Settings { machine: MachineMemory::Host, ..Settings::default() };
        let json = Record::new(&host, None).to_json();
        assert_eq!(json["host_memory"], serde_json::json!(true));
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back.settings().machine, MachineMemory::Host);
        assert!(
            Record::new(&Settings::default(), None).to_json().get("host_memory").is_none(),
            "the default is not written"
        );
    }

    #[test]
    fn kubernetes_names_travel_to_the_next_heapcapd() {
        let pod = Pod { namespace: "default".into(), name: "web".into(), container: "app".into() };
        let record = Record::new(&Settings::default(), Some(pod.clone()));
        let json = record.to_json();
        assert_eq!(json["pod"], serde_json::json!({"namespace": "default", "name": "web", "container": "app"}));
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back.pod, Some(pod));
    }

    #[test]
    fn strict_travels_to_the_next_heapcapd() {
        let settings = Settings { counting: Counting::Strict, ..Settings::default() };
        let json = Record::new(&settings, None).to_json();
        assert_eq!(json["strict"], true);
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back.settings().counting, Counting::Strict);
        let mut ledger = Ledger::new(Limits::default(), Mode::Enforce, 4096);
        ledger.set_counting(Counting::Strict);
        assert_eq!(Record::of(&ledger, None, MachineMemory::Quota).settings().counting, Counting::Strict);
    }
}
