//! Nodes, and the life cycle of VMs: create, start, stop, delete.

use super::{usage, R};
use crate::client;
use crate::{Agent, AgentError};
use cluster::{now_ms, SpecExt, VmRecord, VmSpec, VmState};
use contract::api::{NodeView, SerialTail, VmEdit, VmView, SERIAL_TAIL_MAX};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Agent {
    /// Nodes with their use.
    pub fn nodes_view(&self) -> R<Vec<NodeView>> {
        let vms = self.store.vms()?;
        let running = self.store.running_migrations()?;
        Ok(self
            .store
            .nodes()?
            .into_iter()
            .map(|n| {
                let (cores_used, memory_used_mib, vms) = usage(&n.info.name, &vms, &running);
                let i = n.info;
                NodeView {
                    name: i.name,
                    address: i.address,
                    alive: n.alive,
                    schedulable: i.schedulable,
                    cpu_vendor: i.cpu_vendor,
                    cpu_model: i.cpu_model,
                    cpu_features: i.cpu_features,
                    cpu_limit: i.cpu_limit,
                    cores: i.cores,
                    memory_mib: i.memory_mib,
                    cores_used,
                    memory_used_mib,
                    vms,
                    storage: i.storage,
                    networks: i.networks,
                }
            })
            .collect())
    }

    /// Features every alive node offers: the `cluster` CPU profile.
    pub fn cluster_features(&self) -> R<BTreeSet<String>> {
        let nodes = self.store.nodes()?;
        let mut it = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.info.cpu_features.iter().cloned().collect::<BTreeSet<_>>());
        let first = it.next().unwrap_or_default();
        Ok(it.fold(first, |a, b| a.intersection(&b).cloned().collect()))
    }

    /// Creates a VM (stopped) owned by `node` (default: this node).
    pub fn create_vm(&self, spec: VmSpec, node: Option<String>) -> R<VmRecord> {
        spec.validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let owner = node.unwrap_or_else(|| self.name().to_string());
        let n = self.node_or_404(&owner)?;
        super::spec_paths_allowed(&spec, &owner, &n.info.storage, &n.info.boot)
            .map_err(AgentError::BadRequest)?;
        let rec = VmRecord {
            spec,
            owner,
            state: VmState::Stopped,
            cpu_features: vec![],
            migration: None,
            handover_to: None,
            last_error: None,
            updated_ms: now_ms(),
        };
        self.store.create_vm(&rec)?;
        self.metrics.inc("ferry_vms_created_total");
        Ok(rec)
    }

    /// The VM with what its worker says and its recent migrations.
    pub fn vm_view(&self, name: &str) -> R<VmView> {
        let v = self.vm_or_404(name)?;
        let worker = if v.value.owner == self.name() {
            self.worker_of(name).and_then(|w| w.state())
        } else {
            self.address_of(&v.value.owner)
                .ok()
                .and_then(|a| {
                    client::get::<VmView>(
                        client::node(&v.value.owner, &a),
                        &format!("/v1/vms/{name}"),
                    )
                    .ok()
                })
                .and_then(|x| x.worker)
        };
        let migrations = self.store.migrations_of(name, 10)?;
        Ok(VmView {
            vm: v.value,
            version: v.version,
            worker,
            migrations,
        })
    }

    /// Lets the owner node's agent do a VM operation (`path`, POST without a body).
    fn forward_to_owner(&self, owner: &str, path: &str) -> R<VmRecord> {
        let a = self.address_of(owner)?;
        client::post(
            client::node(owner, &a),
            path,
            &serde_json::json!({}),
            Some(Duration::from_secs(60)),
        )
    }

    /// The CPU profile argument for a worker of `spec` on this node.
    fn worker_profile(&self, spec: &VmSpec) -> R<String> {
        let mine = self.node_info();
        Ok(match spec.cpu_profile.as_str() {
            "baseline" => "baseline".to_string(),
            "cluster" => format!(
                "features={}",
                self.cluster_features()?
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ if self.cfg.cpu_limit.is_some() => {
                format!("features={}", mine.cpu_features.join(","))
            }
            _ => "host".to_string(),
        })
    }

    /// Starts a stopped (or crashed) VM on its owner node.
    pub fn start_vm(&self, name: &str) -> R<VmRecord> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            return self.forward_to_owner(&v.value.owner, &format!("/v1/vms/{name}/start"));
        }
        match v.value.state {
            VmState::Stopped | VmState::Crashed => {}
            s => return Err(AgentError::Conflict(format!("VM {name} is {s}"))),
        }
        // Until the worker is registered, reconciliation must not judge this VM.
        let _busy = self.busy.hold(name).ok_or_else(|| {
            AgentError::Conflict(format!("another operation on VM {name} is in progress"))
        })?;
        let spec = v.value.spec.clone();
        let mine = self.node_info();
        super::spec_paths_allowed(&spec, self.name(), &mine.storage, &mine.boot)
            .map_err(AgentError::Conflict)?;
        let profile = self.worker_profile(&spec)?;
        let features = {
            let kvm = vmm::open_kvm().map_err(|e| AgentError::Internal(e.to_string()))?;
            let supported =
                vmm::cpuid::supported(&kvm).map_err(|e| AgentError::Internal(e.to_string()))?;
            vmm::cpuid::build(&supported, &profile)
                .map_err(|e| AgentError::Conflict(format!("VM {name} cannot run here: {e}")))?
                .features()
                .into_iter()
                .collect::<Vec<_>>()
        };
        let (cores, mem, _) = usage(
            self.name(),
            &self.store.vms()?,
            &self.store.running_migrations()?,
        );
        if cores + spec.vcpus as u32 > mine.cores || mem + spec.memory_mib > mine.memory_mib {
            return Err(AgentError::Conflict(format!(
                "node {} has {} cores and {} MiB free, VM {name} needs {} and {} MiB",
                self.name(),
                mine.cores.saturating_sub(cores),
                mine.memory_mib.saturating_sub(mem),
                spec.vcpus,
                spec.memory_mib
            )));
        }
        let backends = self
            .cfg
            .net_backend_args(&spec)
            .map_err(AgentError::Conflict)?;
        // Claim the VM (so no other start races this one), then start the worker.
        self.update_vm(name, |r| {
            // The spec too: an edit between the read above and this claim must not start
            // the VM with the old one while the record shows the new.
            if !matches!(r.state, VmState::Stopped | VmState::Crashed)
                || r.owner != self.name()
                || r.spec != spec
            {
                return Err(AgentError::Conflict(format!("VM {name} changed meanwhile")));
            }
            r.state = VmState::Running;
            r.cpu_features = features.clone();
            r.last_error = None;
            Ok(())
        })?;
        let vm_cfg = spec.vm_config(&profile);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            spec.kernel.clone(),
            "--cmdline".into(),
            spec.cmdline.clone(),
            "--vcpus".into(),
            spec.vcpus.to_string(),
            "--memory-mib".into(),
            spec.memory_mib.to_string(),
            "--cpu-profile".into(),
            profile,
        ];
        if let Some(i) = &spec.initrd {
            args.push("--initrd".into());
            args.push(i.clone());
        }
        for d in &vm_cfg.disks {
            args.push("--disk".into());
            args.push(format!(
                "{}{}",
                d.path.display(),
                if d.read_only { ",ro" } else { "" }
            ));
        }
        for n in &vm_cfg.nics {
            args.push("--nic".into());
            args.push(n.mac.to_string());
        }
        args.extend(backends);
        args.extend(self.cfg.confinement_args());
        // The node's identity for later outgoing migrations, read by the worker now (once
        // it runs as its own user it cannot read the node's key).
        if let Some(files) = &self.cfg.tls {
            for (k, v) in [
                ("--tls-cert", &files.cert),
                ("--tls-key", &files.key),
                ("--tls-ca", &files.ca),
            ] {
                args.extend([k.to_string(), v.display().to_string()]);
            }
        }
        match self.workers.spawn(
            &self.cfg.worker_bin,
            &self.cfg.data_dir,
            name,
            &args,
            self.cfg.worker_uids,
        ) {
            Ok(w) => {
                self.workers.insert(w);
                self.metrics.inc("ferry_vms_started_total");
                Ok(self.vm_or_404(name)?.value)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = self.update_vm(name, |r| {
                    r.state = VmState::Stopped;
                    r.last_error = Some(msg.clone());
                    Ok(())
                });
                Err(AgentError::Internal(msg))
            }
        }
    }

    /// Stops a running VM.
    pub fn stop_vm(&self, name: &str) -> R<VmRecord> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            return self.forward_to_owner(&v.value.owner, &format!("/v1/vms/{name}/stop"));
        }
        match v.value.state {
            VmState::Running | VmState::Crashed => {}
            VmState::Migrating => {
                return Err(AgentError::Conflict(format!(
                    "VM {name} is migrating ({}): cancel the migration first",
                    v.value.migration.as_deref().unwrap_or("?")
                )))
            }
            VmState::Stopped => return Ok(v.value),
        }
        let _busy = self.busy.hold(name).ok_or_else(|| {
            AgentError::Conflict(format!("another operation on VM {name} is in progress"))
        })?;
        if let Some(w) = self.worker_for_op(name) {
            self.workers.remove(name);
            w.stop();
        }
        Ok(self
            .update_vm(name, |r| {
                if r.state == VmState::Migrating {
                    return Err(AgentError::Conflict(format!("VM {name} is migrating")));
                }
                r.state = VmState::Stopped;
                Ok(())
            })?
            .value)
    }

    /// Changes a stopped VM's vCPUs, memory or CPU profile (processor compatibility); the
    /// next start applies them. Refused (409) while the VM runs, migrates or its worker is
    /// being set up; an invalid result (400) changes nothing.
    pub fn edit_vm(&self, name: &str, edit: &VmEdit) -> R<VmRecord> {
        if edit.is_empty() {
            return Err(AgentError::BadRequest(
                "nothing to change: give vcpus, memory_mib or cpu_profile".into(),
            ));
        }
        let _busy = self.busy.hold(name).ok_or_else(|| {
            AgentError::Conflict(format!("another operation on VM {name} is in progress"))
        })?;
        Ok(self
            .update_vm(name, |r| {
                if !matches!(r.state, VmState::Stopped | VmState::Crashed) {
                    return Err(AgentError::Conflict(format!(
                        "VM {name} is {}: only a stopped VM can be changed (ferry vm stop {name})",
                        r.state
                    )));
                }
                let mut spec = r.spec.clone();
                if let Some(v) = edit.vcpus {
                    spec.vcpus = v;
                }
                if let Some(m) = edit.memory_mib {
                    spec.memory_mib = m;
                }
                if let Some(p) = &edit.cpu_profile {
                    spec.cpu_profile = p.clone();
                }
                spec.validate()
                    .map_err(|e| AgentError::BadRequest(e.to_string()))?;
                r.spec = spec;
                Ok(())
            })?
            .value)
    }

    /// The end of the VM's serial console log, read on its owner node.
    pub fn serial_tail(&self, name: &str) -> R<SerialTail> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            let a = self.address_of(&v.value.owner)?;
            return client::get(
                client::node(&v.value.owner, &a),
                &format!("/v1/vms/{name}/serial"),
            );
        }
        let path = crate::workers::console_dir(&crate::workers::vm_dir(&self.cfg.data_dir, name))
            .join("serial.log");
        // The worker owns the directory: its files are not followed if they are links, and
        // a FIFO or device does not block this thread.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path);
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SerialTail {
                    vm: name.into(),
                    node: self.name().into(),
                    text: String::new(),
                    truncated: false,
                })
            }
            Err(e) => return Err(AgentError::Internal(format!("{}: {e}", path.display()))),
        };
        let meta = f
            .metadata()
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if !meta.is_file() {
            return Err(AgentError::Internal(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let len = meta.len();
        let from = len.saturating_sub(SERIAL_TAIL_MAX);
        f.seek(SeekFrom::Start(from))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut buf = Vec::new();
        f.take(SERIAL_TAIL_MAX)
            .read_to_end(&mut buf)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(SerialTail {
            vm: name.into(),
            node: self.name().into(),
            text: String::from_utf8_lossy(&buf).into_owned(),
            truncated: from > 0,
        })
    }

    /// Deletes a stopped VM.
    pub fn delete_vm(&self, name: &str) -> R<()> {
        let v = self.vm_or_404(name)?;
        if !matches!(v.value.state, VmState::Stopped | VmState::Crashed) {
            return Err(AgentError::Conflict(format!(
                "VM {name} is {}: stop it first",
                v.value.state
            )));
        }
        let _busy = self.busy.hold(name).ok_or_else(|| {
            AgentError::Conflict(format!("another operation on VM {name} is in progress"))
        })?;
        if v.value.state == VmState::Crashed && v.value.owner == self.name() {
            if let Some(w) = self.workers.remove(name) {
                w.expected_exit.store(true, Ordering::SeqCst);
                w.stop();
            }
        }
        if !self.store.delete_vm(name, v.version)? {
            return Err(AgentError::Conflict(format!(
                "VM {name} changed meanwhile; try again"
            )));
        }
        Ok(())
    }
}
