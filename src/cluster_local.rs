//! `clickagg cluster-local`: a cluster of N processes on 127.0.0.1, for trying cluster mode on
//! one machine. It does what an operator does on several machines (a hostfile, then one
//! `clickagg run -n N -p I -h HOSTFILE` per process), and nothing more.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Writes a hostfile of `processes` free loopback ports into `dir` and returns its path.
///
/// The ports are free when chosen; another program could take one before clickagg binds it, in
/// which case that process reports the port in use.
pub fn write_local_hostfile(dir: &Path, processes: usize) -> Result<PathBuf, String> {
    let mut lines = String::new();
    let listeners: Vec<TcpListener> = (0..processes)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}")))
        .collect::<Result<_, _>>()?;
    for listener in &listeners {
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        lines.push_str(&format!("{address}\n"));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("hostfile");
    std::fs::write(&path, lines).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Starts `processes` copies of this binary as `run -n processes -p i -w workers -h HOSTFILE
/// run_args…`, waits for all, and fails if any fails (stopping the others).
pub fn cluster_local(processes: usize, workers: usize, run_args: &[String]) -> Result<(), String> {
    if processes == 0 || workers == 0 {
        return Err("cluster-local needs at least one process and one worker".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the clickagg binary: {e}"))?;
    let dir = std::env::temp_dir().join(format!("clickagg-cluster-{}", std::process::id()));
    let hostfile = write_local_hostfile(&dir, processes)?;
    eprintln!("clickagg cluster-local: {processes} processes × {workers} workers, hostfile {}", hostfile.display());
    let mut children: Vec<(usize, Child)> = Vec::new();
    for process in 0..processes {
        let mut command = Command::new(&exe);
        command.arg("run").args(run_args).args(["-n", &processes.to_string(), "-p", &process.to_string()]);
        command.args(["-w", &workers.to_string(), "--hostfile"]).arg(&hostfile);
        match command.spawn() {
            Ok(child) => children.push((process, child)),
            Err(e) => {
                stop(&mut children);
                return Err(format!("starting process {process}: {e}"));
            }
        }
    }
    // SIGTERM or SIGINT to this process goes on to every process of the cluster, which each stop
    // as they would alone (a follower at its last commit); then this one exits with them.
    let stop_requested = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop_requested));
    }
    let mut forwarded = false;
    let mut failure = None;
    while !children.is_empty() {
        if stop_requested.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (_, child) in &children {
                // SAFETY: a signal to a child this process started and has not reaped.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let mut index = 0;
        while index < children.len() {
            let (process, child) = &mut children[index];
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failure.is_none() {
                        failure = Some(format!("process {process} failed ({status})"));
                    }
                    children.swap_remove(index);
                }
                Ok(None) => index += 1,
                Err(e) => {
                    failure.get_or_insert(format!("waiting for process {process}: {e}"));
                    children.swap_remove(index);
                }
            }
        }
        if failure.is_some() {
            // The others would notice the lost peer by themselves; do not make the user wait.
            stop(&mut children);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
    failure.map_or(Ok(()), Err)
}

fn stop(children: &mut Vec<(usize, Child)>) {
    for (_, child) in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.clear();
}
