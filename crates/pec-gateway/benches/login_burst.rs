//! Login burst benchmark: what a gateway that has just started pays when
//! one client's connections arrive at once, all logging in with the same
//! mailbox and password (as a replica that has just joined the Service
//! sees them).
//!
//! For N = 2, 4, 8 and 16 connections, each on a thread of its own (the
//! gateway runs each login on tokio's blocking pool), all released at
//! once by a barrier, with one mailbox hashed at the default argon2id cost:
//! - **shared**: one [`Credentials`], fresh for the round, as a new gateway
//!   process has it: logins with the same credentials wait for the first
//!   check under way and then find the login proven;
//! - **baseline**: a fresh [`Credentials`] for every connection, so every
//!   login runs argon2 of its own at the same time as the others: what
//!   the gateway did before logins waited for each other.
//!
//! Printed per N: the time until every connection is answered in both, the
//! ratio shared / baseline, and the CPU the process spent on each (from
//! `/proc/self/stat`). Runs 5 rounds of each, alternating, and reports the
//! medians. Nothing about timings is asserted; the program exits non-zero
//! only if a login is refused.
//!
//! `cargo bench -p pec-gateway --bench login_burst`

use std::{
    sync::Barrier,
    time::{Duration, Instant},
};

use pec_gateway::credentials::{Credentials, hash_password};

const DOMAIN: &str = "burst.test";
const PASSWORD: &str = "a long enough password";
const ROUNDS: usize = 5;

/// The process's CPU time (user + system) so far, from `/proc/self/stat`.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel reports in clock ticks; Linux's USER_HZ is 100.
    Duration::from_millis(ticks * 10)
}

/// `n` logins released at once, each against the credentials `pick`
/// hands its thread; the wall time until all are answered and the CPU
/// the process spent meanwhile.
fn burst<'a>(n: usize, pick: impl Fn(usize) -> &'a Credentials + Sync) -> (Duration, Duration) {
    let barrier = Barrier::new(n + 1);
    let cpu_before = cpu();
    let (wall, answers) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, credentials) = (&barrier, pick(i));
                scope.spawn(move || {
                    barrier.wait();
                    credentials.verify("mario", PASSWORD, DOMAIN)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let answers: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("a login thread"))
            .collect();
        (start.elapsed(), answers)
    });
    if answers.iter().any(Option::is_none) {
        eprintln!("a login was refused: {answers:?}");
        std::process::exit(1);
    }
    (wall, cpu() - cpu_before)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let text = format!("mario:{}\n", hash_password(PASSWORD).expect("a hash"));
    let fresh = || Credentials::parse(&text).expect("the credentials file");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("login burst: one mailbox, argon2id at the default cost, {cores} cores");
    println!(
        "{:>4}  {:>12} {:>12} {:>7}  {:>12} {:>12}",
        "N", "shared", "baseline", "ratio", "shared CPU", "baseline CPU"
    );
    for n in [2, 4, 8, 16] {
        let (mut shared, mut baseline) = (Vec::new(), Vec::new());
        let (mut shared_cpu, mut baseline_cpu) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let one = fresh();
            let (wall, cpu) = burst(n, |_| &one);
            shared.push(wall);
            shared_cpu.push(cpu);
            let each: Vec<Credentials> = (0..n).map(|_| fresh()).collect();
            let (wall, cpu) = burst(n, |i| &each[i]);
            baseline.push(wall);
            baseline_cpu.push(cpu);
        }
        let (shared, baseline) = (median(shared), median(baseline));
        println!(
            "{n:>4}  {:>12} {:>12} {:>7.2}  {:>12} {:>12}",
            ms(shared),
            ms(baseline),
            shared.as_secs_f64() / baseline.as_secs_f64(),
            ms(median(shared_cpu)),
            ms(median(baseline_cpu)),
        );
    }
}
