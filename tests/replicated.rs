//! Three coordinators replicating their metadata with Raft, running the engagement pipeline
//! through the loss of the leader, its return, and the loss of a majority.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use eddy_tests::{check_outcomes, datagen_summary, Pipeline};
use serde_json::Value;

fn coordinators(p: &Pipeline) -> Result<Vec<Value>> {
    Ok(p.cluster.eddy_json(&["coordinators"])?["coordinators"].as_array().context("coordinators")?.clone())
}

fn completed_checkpoint(status: &Value) -> bool {
    status["checkpoints"].as_array().into_iter().flatten().any(|c| c["state"] == "completed")
}

/// `kill -9` of the leading coordinator while events flow: another leads within seconds (its
/// time is printed; `scripts/bench.sh failover` measures it), the jobs run on and the outcomes
/// are exact; the old leader comes back as a follower and catches up. With two of the three
/// down, a submit fails with a clear message and leaves nothing; with them back, work goes on.
#[test]
fn the_pipeline_survives_the_loss_of_the_leading_coordinator() -> Result<()> {
    let mut p = Pipeline::start_replicated("raft", 3, 2)?;
    let before =
        p.datagen(&["--contents", "40", "--count", "1000", "--rate", "5000", "--seed", "21", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let (ingest, process) = p.run_both(&[])?;
    let args = [
        "--contents",
        "40",
        "--count",
        "6000",
        "--rate",
        "600",
        "--seed",
        "22",
        "--updates-pct",
        "10",
        "--deletes-pct",
        "5",
        "--unknown-pct",
        "5",
    ];
    let during = p.datagen_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    p.cluster.wait(Duration::from_secs(60), "a checkpoint of each job", |c| {
        Ok(completed_checkpoint(&c.status(&ingest)?) && completed_checkpoint(&c.status(&process)?))
    })?;

    let attempts = |p: &Pipeline| -> Result<Vec<u64>> {
        [&ingest, &process].iter().map(|j| p.cluster.status(j)?["attempt"].as_u64().context("attempt")).collect()
    };
    let before_kill = attempts(&p)?;
    let old = p.cluster.leader()?;
    eprintln!("killing coordinator {old}, the leader");
    p.cluster.kill_coordinator(old)?;
    let killed = Instant::now();
    p.cluster.wait(Duration::from_secs(30), "another coordinator to lead", |c| Ok(c.leader()? != old && c.eddy_json(&["jobs"]).is_ok()))?;
    eprintln!("a new leader served {} ms after the kill", killed.elapsed().as_millis());
    // The new leader adopts the running tasks: the jobs run on, same attempts, and checkpoint.
    for job in [&ingest, &process] {
        p.cluster.wait(Duration::from_secs(60), "the new leader to adopt the job", |c| {
            let s = c.status(job)?;
            Ok(s["state"] == "running" && s["cause"].as_str().is_some_and(|c| c.contains("adopted")))
        })?;
    }
    ensure!(attempts(&p)? == before_kill, "the jobs restarted: attempts {before_kill:?} -> {:?}", attempts(&p)?);

    // The old leader comes back from its disk and follows, caught up.
    p.cluster.start_coordinator(old)?;
    p.cluster.wait(Duration::from_secs(30), "the old leader to catch up as a follower", |_| {
        let list = coordinators(&p)?;
        let leader_applied = list.iter().find(|c| c["role"] == "leader").and_then(|c| c["applied"].as_u64());
        let back = list.iter().find(|c| c["id"] == old).context("the old leader is listed")?;
        Ok(back["role"] == "follower" && back["applied"].as_u64() == leader_applied)
    })?;

    let during = datagen_summary(during.wait_with_output()?, &args)?;
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"] + during["deleted"])?;

    // Two of three down: no majority, so no writes, and a clear error.
    let leader = p.cluster.leader()?;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let jobs_before = p.cluster.eddy_json(&["jobs"])?;
    p.cluster.kill_coordinator(leader)?;
    p.cluster.kill_coordinator(others[0])?;
    let spec = p.cluster.dir.0.join("small.toml");
    let small = r#"
name = "small"

[[source]]
name = "in"
connector = "generator"
options = { count = 10, keys = 1, seed = 1 }

[[sink]]
name = "out"
input = "in"
connector = "blackhole"
"#;
    std::fs::write(&spec, small)?;
    let refused = p.cluster.eddy(&["submit", spec.to_str().context("path")?])?;
    let message = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success() && refused.status.code() == Some(3), "a submit without a majority must fail: {message}");
    ensure!(message.contains("no coordinator leads") || message.contains("majority"), "unclear message: {message}");
    eprintln!("without a majority: {}", message.trim());

    // Back: the jobs are as they were (nothing half-applied), and work continues.
    p.cluster.start_coordinator(leader)?;
    p.cluster.start_coordinator(others[0])?;
    p.cluster.wait(Duration::from_secs(30), "a leader again", |c| Ok(c.eddy_json(&["jobs"]).is_ok()))?;
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v.as_array().into_iter().flatten().filter_map(|j| j["job_id"].as_str().map(String::from)).collect();
        ids.sort();
        ids
    };
    ensure!(ids(&p.cluster.eddy_json(&["jobs"])?) == ids(&jobs_before), "the refused submit left a job behind");
    for job in [&ingest, &process] {
        p.cluster.wait(Duration::from_secs(60), "the job to run again", |c| Ok(c.status(job)?["state"] == "running"))?;
    }
    let more =
        p.datagen(&["--contents", "40", "--count", "500", "--rate", "2000", "--seed", "23", "--updates-pct", "0", "--deletes-pct", "0"])?;
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"] + during["deleted"] + more["inserted"])
}

/// What coordinator `address` (in namespace `ns`) says of itself, asked from inside its namespace.
fn own_view(ns: &str, address: &str) -> Result<Value> {
    let out =
        eddy_tests::in_netns(Some(ns), &eddy_tests::bin("eddy")).args(["coordinators", "--json", "--coordinator", address]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let list = v["coordinators"].as_array().context("coordinators")?;
    list.iter().find(|c| c["address"] == address).cloned().context("itself listed")
}

/// Across real network boundaries (a namespace per coordinator and one for the worker, on one
/// bridge): the leader cut off from the others steps down and takes no writes, the majority
/// elects another in a later term (no two leaders), and once joined again the old leader follows.
/// A worker cut off from every coordinator stops its tasks when its lease runs out.
#[test]
fn a_cut_off_leader_steps_down_and_a_cut_off_worker_stops_its_tasks() -> Result<()> {
    let mut net = eddy_tests::Network::create()?;
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        let (ns, ip) = net.host(i)?;
        hosts.push((Some(ns), format!("{ip}:7000")));
    }
    let (worker_ns, worker_ip) = net.host(11)?;
    let mut cluster = eddy_tests::Cluster::start_replicated_on("partition", &hosts, 0, 2)?;
    cluster.add_worker_on("w1", 2, Some(&worker_ns), &worker_ip)?;
    cluster.wait(Duration::from_secs(30), "the worker to register", |c| {
        Ok(c.eddy_json(&["workers"])?.as_array().is_some_and(|w| w.len() == 1))
    })?;
    let job = cluster.submit("endless", &super::endless_spec(1))?;
    cluster.wait_state(&job, "running", Duration::from_secs(30))?;

    let old = cluster.leader()?;
    let (old_ns, old_address) = (hosts[old as usize - 1].0.clone().context("namespace")?, hosts[old as usize - 1].1.clone());
    let old_term = own_view(&old_ns, &old_address)?["term"].as_u64().context("term")?;
    let others: Vec<String> = (1..=3).filter(|i| *i != old).map(|i| hosts[i as usize - 1].1.clone()).collect();
    let majority = |args: &[&str]| cluster.eddy_env(args, &[("EDDY_COORDINATOR", &others.join(","))]);
    eprintln!("cutting off coordinator {old}, the leader (term {old_term})");
    net.cut(&old_ns)?;
    let cut = Instant::now();
    cluster.wait(Duration::from_secs(30), "the majority to elect another leader", |_| {
        let out = majority(&["coordinators", "--json"])?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let leader = v["coordinators"].as_array().into_iter().flatten().find(|c| c["role"] == "leader").cloned();
        Ok(leader.is_some_and(|l| l["id"] != old && l["term"].as_u64() > Some(old_term)))
    })?;
    eprintln!("a new leader {} ms after the cut", cut.elapsed().as_millis());
    cluster
        .wait(Duration::from_secs(30), "the cut-off leader to step down", |_| Ok(own_view(&old_ns, &old_address)?["role"] != "leader"))?;
    // The cut-off side takes no writes.
    let spec = cluster.dir.0.join("endless.toml");
    let refused = eddy_tests::in_netns(Some(&old_ns), &eddy_tests::bin("eddy"))
        .args(["submit", spec.to_str().context("path")?, "--coordinator", &old_address])
        .output()?;
    ensure!(!refused.status.success(), "the cut-off coordinator took a submit");
    eprintln!("cut-off side: {}", String::from_utf8_lossy(&refused.stderr).trim());
    // The majority does (once the worker, whose lease ran out with the old leader, has joined it).
    cluster.wait(Duration::from_secs(60), "the majority to take a submit", |_| {
        Ok(majority(&["submit", spec.to_str().context("path")?])?.status.success())
    })?;

    // Joined again, the old leader follows, caught up.
    net.heal(&old_ns)?;
    cluster.wait(Duration::from_secs(30), "the old leader to follow again", |_| {
        let me = own_view(&old_ns, &old_address)?;
        Ok(me["role"] == "follower" && me["term"].as_u64() > Some(old_term))
    })?;
    cluster.wait(Duration::from_secs(60), "the job to run", |c| Ok(c.status(&job)?["state"] == "running"))?;

    // The worker cut off from every coordinator stops its tasks within its lease.
    let log = cluster.dir.0.join("w1.log");
    let stopped = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("cancelling job tasks") && l.contains("the lease"))
            .count()
    };
    let before = stopped();
    net.cut(&worker_ns)?;
    let cut = Instant::now();
    cluster.wait(Duration::from_secs(30), "the cut-off worker to stop its tasks", |_| Ok(stopped() > before))?;
    let took = cut.elapsed();
    eprintln!("the cut-off worker stopped its tasks after {took:?}");
    ensure!(took < Duration::from_secs(20), "the lease is 8 s; the worker took {took:?}");
    net.heal(&worker_ns)?;
    cluster.wait(Duration::from_secs(60), "the job to run again", |c| Ok(c.status(&job)?["state"] == "running"))?;
    drop(cluster);
    Ok(())
}

/// Membership through Raft: a fourth coordinator started to join is added with `eddy coordinators
/// add`, catches up from the leader (the metadata with it), and is removed again.
#[test]
fn a_coordinator_is_added_and_removed() -> Result<()> {
    let mut cluster = eddy_tests::Cluster::start_replicated("members", 3, 1, 2)?;
    let job = cluster.submit("endless", &super::endless_spec(1))?;
    cluster.wait_state(&job, "running", Duration::from_secs(30))?;
    let address = cluster.join_coordinator(4)?;
    let added = cluster.eddy_json(&["coordinators", "add", "4", &address])?;
    eprintln!("after add: {added}");
    cluster.wait(Duration::from_secs(30), "the new coordinator to catch up", |c| {
        let v = c.eddy_json(&["coordinators"])?;
        let list = v["coordinators"].as_array().context("coordinators")?;
        let leader = list.iter().find(|c| c["role"] == "leader").and_then(|c| c["applied"].as_u64());
        Ok(list.len() == 4 && list.iter().any(|c| c["id"] == 4 && c["role"] == "follower" && c["applied"].as_u64() == leader))
    })?;
    // It holds the jobs: asked directly, it knows the leader, and the CLI through it sees the job.
    let through_new = cluster.eddy_env(&["status", &job, "--json"], &[("EDDY_COORDINATOR", &address)])?;
    ensure!(through_new.status.success(), "{}", String::from_utf8_lossy(&through_new.stderr));
    let removed = cluster.eddy_json(&["coordinators", "remove", "4"])?;
    let ids: Vec<u64> = removed["coordinators"].as_array().context("coordinators")?.iter().filter_map(|c| c["id"].as_u64()).collect();
    ensure!(!ids.contains(&4), "coordinator 4 is still a member: {removed}");
    Ok(())
}
