//! The VRRPv3 state machine of one virtual router (RFC 9568, section 6.4),
//! without I/O or clock: the caller hands it the time, the advertisements
//! it received and its timer's expiry, and carries out the [`Action`]s it
//! returns. Every rule of the RFC's Backup and Master states is a branch
//! here, and a test below.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::packet::Advert;

/// A virtual router as this router takes part in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub vrid: u8,
    /// 1 to 254; 255 for the address owner.
    pub priority: u8,
    /// This router's advertisement interval, centiseconds.
    pub interval_cs: u16,
    /// Whether a Backup of higher priority takes over from a live Master
    /// of lower priority.
    pub preempt: bool,
    /// The protected addresses, of one family.
    pub addresses: Vec<IpAddr>,
    /// This router's primary address on the link, of that family: the
    /// tie-breaker between equal priorities, and the adverts' source.
    pub primary: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Initialize,
    Backup,
    Master,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
        }
    }
}

/// What the caller does for the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Multicast this advertisement.
    Send(Advert),
    /// Announce the addresses as this router's: gratuitous ARP for IPv4,
    /// unsolicited neighbour advertisements for IPv6.
    Announce,
    /// The machine moved to this state.
    Became(State),
}

/// One virtual router's machine.
#[derive(Clone, Debug)]
pub struct Machine {
    cfg: Config,
    state: State,
    /// The Master's interval as its adverts say (centiseconds).
    master_interval_cs: u16,
    /// Backup: when the Master is taken for dead.
    master_down_at: Option<Instant>,
    /// Master: when the next advertisement is due.
    advert_at: Option<Instant>,
}

fn cs(n: u32) -> Duration {
    Duration::from_millis(10 * u64::from(n))
}

impl Machine {
    pub fn new(cfg: Config) -> Machine {
        let master_interval_cs = cfg.interval_cs;
        Machine {
            cfg,
            state: State::Initialize,
            master_interval_cs,
            master_down_at: None,
            advert_at: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `((256 - Priority) * Master_Adver_Interval) / 256`.
    pub fn skew(&self) -> Duration {
        cs(u32::from(self.master_interval_cs)) * (256 - u32::from(self.cfg.priority)) / 256
    }

    /// `3 * Master_Adver_Interval + Skew_Time`.
    pub fn master_down_interval(&self) -> Duration {
        cs(3 * u32::from(self.master_interval_cs)) + self.skew()
    }

    /// When [`Machine::on_timer`] is next due.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Initialize => None,
            State::Backup => self.master_down_at,
            State::Master => self.advert_at,
        }
    }

    fn advert(&self, priority: u8) -> Advert {
        Advert {
            vrid: self.cfg.vrid,
            priority,
            interval_cs: self.cfg.interval_cs,
            addresses: self.cfg.addresses.clone(),
        }
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Master;
        self.master_down_at = None;
        self.advert_at = Some(now + cs(self.cfg.interval_cs.into()));
        vec![
            Action::Send(self.advert(self.cfg.priority)),
            Action::Announce,
            Action::Became(State::Master),
        ]
    }

    fn become_backup(&mut self, now: Instant, master_interval_cs: u16) -> Vec<Action> {
        let was = self.state;
        self.state = State::Backup;
        self.advert_at = None;
        self.master_interval_cs = master_interval_cs;
        self.master_down_at = Some(now + self.master_down_interval());
        if was == State::Backup {
            vec![]
        } else {
            vec![Action::Became(State::Backup)]
        }
    }

    /// The Startup event.
    pub fn startup(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Initialize {
            return vec![];
        }
        if self.cfg.priority == 255 {
            self.become_master(now)
        } else {
            self.become_backup(now, self.cfg.interval_cs)
        }
    }

    /// The timer's expiry: the Master_Down_Timer in Backup, the
    /// Adver_Timer in Master. Early calls do nothing.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Backup if self.master_down_at.is_some_and(|t| now >= t) => self.become_master(now),
            State::Master if self.advert_at.is_some_and(|t| now >= t) => {
                self.advert_at = Some(now + cs(self.cfg.interval_cs.into()));
                vec![Action::Send(self.advert(self.cfg.priority))]
            }
            _ => vec![],
        }
    }

    /// An advertisement for this virtual router from `from` (its source:
    /// the sender's primary address).
    pub fn on_advert(&mut self, now: Instant, from: IpAddr, a: &Advert) -> Vec<Action> {
        if a.vrid != self.cfg.vrid {
            return vec![];
        }
        match self.state {
            State::Initialize => vec![],
            State::Backup => {
                if a.priority == 0 {
                    // The Master resigned: take over after the skew alone.
                    self.master_down_at = Some(now + self.skew());
                    vec![]
                } else if !self.cfg.preempt || a.priority >= self.cfg.priority {
                    self.become_backup(now, a.interval_cs)
                } else {
                    // A Master of lower priority, and we preempt: let the
                    // Master_Down_Timer run out.
                    vec![]
                }
            }
            State::Master => {
                if a.priority == 0 {
                    // Another resigned: say at once who is Master.
                    self.advert_at = Some(now + cs(self.cfg.interval_cs.into()));
                    vec![Action::Send(self.advert(self.cfg.priority))]
                } else if a.priority > self.cfg.priority || (a.priority == self.cfg.priority && from > self.cfg.primary)
                {
                    self.become_backup(now, a.interval_cs)
                } else {
                    vec![]
                }
            }
        }
    }

    /// The Shutdown event: a Master resigns with priority 0, so a Backup
    /// takes over after its skew alone.
    pub fn shutdown(&mut self) -> Vec<Action> {
        let was = self.state;
        self.state = State::Initialize;
        self.master_down_at = None;
        self.advert_at = None;
        match was {
            State::Master => vec![Action::Send(self.advert(0)), Action::Became(State::Initialize)],
            State::Backup => vec![Action::Became(State::Initialize)],
            State::Initialize => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn machine(priority: u8, preempt: bool) -> Machine {
        Machine::new(Config {
            vrid: 9,
            priority,
            interval_cs: 10,
            preempt,
            addresses: vec![ip("10.0.0.100")],
            primary: ip("10.0.0.5"),
        })
    }

    fn advert(priority: u8, interval_cs: u16) -> Advert {
        Advert {
            vrid: 9,
            priority,
            interval_cs,
            addresses: vec![ip("10.0.0.100")],
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn timers_follow_the_masters_interval_and_the_priority() {
        let m = machine(100, true);
        // (256 - 100) * 100 ms / 256 = 60.9 ms; 3 * 100 ms + that.
        assert_eq!(m.skew(), Duration::from_micros(60_937) + Duration::from_nanos(500));
        assert_eq!(m.master_down_interval(), ms(300) + m.skew());
        let hi = machine(254, true);
        assert!(hi.skew() < ms(1), "{:?}", hi.skew());
    }

    /// Backup: the Master's adverts hold it back; their silence for the
    /// Master_Down_Interval makes it Master, announcing the addresses.
    #[test]
    fn a_backup_takes_over_when_the_master_falls_silent() {
        let t0 = Instant::now();
        let mut m = machine(100, true);
        assert_eq!(m.startup(t0), vec![Action::Became(State::Backup)]);
        assert_eq!(m.deadline(), Some(t0 + m.master_down_interval()));
        // A Master of higher priority at 20 cs: the down interval follows
        // its interval, not ours.
        let t1 = t0 + ms(100);
        assert_eq!(m.on_advert(t1, ip("10.0.0.9"), &advert(200, 20)), vec![]);
        assert_eq!(m.master_down_interval(), ms(600) + m.skew());
        assert_eq!(m.deadline(), Some(t1 + m.master_down_interval()));
        // Early: nothing.
        assert_eq!(m.on_timer(t1 + ms(600)), vec![]);
        assert_eq!(m.state(), State::Backup);
        let t2 = m.deadline().unwrap();
        assert_eq!(
            m.on_timer(t2),
            vec![
                Action::Send(advert(100, 10)),
                Action::Announce,
                Action::Became(State::Master)
            ]
        );
        // Master: an advert every interval of its own.
        assert_eq!(m.deadline(), Some(t2 + ms(100)));
        assert_eq!(m.on_timer(t2 + ms(100)), vec![Action::Send(advert(100, 10))]);
        assert_eq!(m.deadline(), Some(t2 + ms(200)));
        // Another virtual router's adverts are not ours.
        let mut other = advert(250, 10);
        other.vrid = 10;
        assert_eq!(m.on_advert(t2, ip("10.0.0.9"), &other), vec![]);
        assert_eq!(m.state(), State::Master);
    }

    /// A resigning Master (priority 0) is replaced after the skew alone.
    #[test]
    fn a_resignation_hands_over_after_the_skew() {
        let t0 = Instant::now();
        let mut m = machine(100, true);
        m.startup(t0);
        m.on_advert(t0, ip("10.0.0.9"), &advert(200, 10));
        assert_eq!(m.on_advert(t0 + ms(50), ip("10.0.0.9"), &advert(0, 10)), vec![]);
        assert_eq!(m.deadline(), Some(t0 + ms(50) + m.skew()));
        assert!(m
            .on_timer(t0 + ms(50) + m.skew())
            .contains(&Action::Became(State::Master)));
        // And its own shutdown resigns.
        assert_eq!(
            m.shutdown(),
            vec![Action::Send(advert(0, 10)), Action::Became(State::Initialize)]
        );
        assert_eq!(m.deadline(), None);
    }

    /// Preemption: a Backup of higher priority ignores a lower Master and
    /// takes over when its timer runs out; without preemption it defers
    /// to any live Master.
    #[test]
    fn preemption_decides_whether_a_lower_master_is_heard() {
        let t0 = Instant::now();
        let mut m = machine(200, true);
        m.startup(t0);
        let down = m.deadline().unwrap();
        assert_eq!(m.on_advert(t0 + ms(100), ip("10.0.0.9"), &advert(100, 10)), vec![]);
        assert_eq!(
            m.deadline(),
            Some(down),
            "a lower Master does not hold a preempting Backup"
        );
        assert!(m.on_timer(down).contains(&Action::Became(State::Master)));

        let mut m = machine(200, false);
        m.startup(t0);
        let t1 = t0 + ms(100);
        m.on_advert(t1, ip("10.0.0.9"), &advert(100, 10));
        assert_eq!(m.deadline(), Some(t1 + m.master_down_interval()));
    }

    /// Master: a higher priority, or an equal one from a higher address,
    /// sends it back to Backup; a lower one, or a resignation, makes it
    /// advertise.
    #[test]
    fn a_master_yields_only_to_a_better_one() {
        let t0 = Instant::now();
        let mut m = machine(100, true);
        m.startup(t0);
        m.on_timer(m.deadline().unwrap());
        assert_eq!(m.state(), State::Master);
        let t1 = t0 + ms(1000);
        assert_eq!(m.on_advert(t1, ip("10.0.0.9"), &advert(50, 10)), vec![]);
        assert_eq!(
            m.on_advert(t1, ip("10.0.0.1"), &advert(100, 10)),
            vec![],
            "equal, lower address"
        );
        assert_eq!(m.state(), State::Master);
        assert_eq!(
            m.on_advert(t1, ip("10.0.0.9"), &advert(0, 10)),
            vec![Action::Send(advert(100, 10))]
        );
        assert_eq!(m.deadline(), Some(t1 + ms(100)));
        assert_eq!(
            m.on_advert(t1, ip("10.0.0.9"), &advert(100, 30)),
            vec![Action::Became(State::Backup)],
            "equal, higher address"
        );
        assert_eq!(m.deadline(), Some(t1 + ms(900) + m.skew()));
        let mut m2 = machine(100, false);
        m2.startup(t0);
        m2.on_timer(m2.deadline().unwrap());
        assert_eq!(
            m2.on_advert(t1, ip("10.0.0.1"), &advert(101, 10)),
            vec![Action::Became(State::Backup)]
        );
    }

    /// The address owner (255) is Master from the start.
    #[test]
    fn the_address_owner_starts_as_master() {
        let mut m = machine(255, true);
        let acts = m.startup(Instant::now());
        assert_eq!(acts[0], Action::Send(advert(255, 10)));
        assert_eq!(m.state(), State::Master);
    }
}
