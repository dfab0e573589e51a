//! Typed MQTT topics.
//!
//! Every Lathe topic lives under the versioned root `lathe/v1`:
//!
//! ```text
//! lathe/v1/<fleet>/<device>/state
//! lathe/v1/<fleet>/<device>/health
//! lathe/v1/<fleet>/<device>/cmd/<command-id>
//! lathe/v1/<fleet>/<device>/res/<command-id>
//! lathe/v1/<fleet>/<device>/pred
//! lathe/v1/<fleet>/<device>/events
//! lathe/v1/<fleet>/<device>/sync/<stream>
//! lathe/v1/<fleet>/<device>/ack/<stream>
//! ```
//!
//! A [`Topic`] formats with `Display` and parses with `FromStr`; the two round-trip for every
//! valid value. Names (fleet, device, command id, stream) are 1 to 64 characters from
//! `[A-Za-z0-9_.-]`, so no name can contain a separator or an MQTT wildcard.

use std::fmt;
use std::str::FromStr;

/// The versioned root of every Lathe topic.
pub const ROOT: &str = "lathe/v1";

/// The longest allowed name segment, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a string is not a valid name segment or topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("name {0:?} is invalid: use 1 to 64 characters from A-Z a-z 0-9 _ . -")]
    BadName(String),
    #[error("topic {0:?} is not under {ROOT}/")]
    NotLathe(String),
    #[error("topic {0:?} has an unknown channel")]
    UnknownChannel(String),
}

/// A validated name segment: a fleet, a device, a command id or a stream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Name(s))
        } else {
            Err(TopicError::BadName(s))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

/// What a topic carries. See SPEC.md for each payload, its QoS and retain flag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Retained birth message; the Last Will overwrites it on an unclean disconnect.
    State,
    /// Periodic health report.
    Health,
    /// A command from the hub to the device.
    Command(Name),
    /// The device's response to the command with the same id.
    Response(Name),
    /// Live predictions.
    Predictions,
    /// Live events.
    Events,
    /// A batch of buffered records of one stream, device to hub.
    Sync(Name),
    /// The hub's acknowledgement for one stream, hub to device.
    Ack(Name),
}

/// A concrete (wildcard-free) Lathe topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub fleet: Name,
    pub device: Name,
    pub channel: Channel,
}

impl Topic {
    pub fn new(fleet: &Name, device: &Name, channel: Channel) -> Self {
        Topic {
            fleet: fleet.clone(),
            device: device.clone(),
            channel,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT}/{}/{}/", self.fleet, self.device)?;
        match &self.channel {
            Channel::State => f.write_str("state"),
            Channel::Health => f.write_str("health"),
            Channel::Command(id) => write!(f, "cmd/{id}"),
            Channel::Response(id) => write!(f, "res/{id}"),
            Channel::Predictions => f.write_str("pred"),
            Channel::Events => f.write_str("events"),
            Channel::Sync(s) => write!(f, "sync/{s}"),
            Channel::Ack(s) => write!(f, "ack/{s}"),
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::NotLathe(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let unknown = || TopicError::UnknownChannel(s.to_string());
        if parts.len() < 3 {
            return Err(unknown());
        }
        let fleet = Name::new(parts[0])?;
        let device = Name::new(parts[1])?;
        let channel = match &parts[2..] {
            ["state"] => Channel::State,
            ["health"] => Channel::Health,
            ["pred"] => Channel::Predictions,
            ["events"] => Channel::Events,
            ["cmd", id] => Channel::Command(Name::new(*id)?),
            ["res", id] => Channel::Response(Name::new(*id)?),
            ["sync", st] => Channel::Sync(Name::new(*st)?),
            ["ack", st] => Channel::Ack(Name::new(*st)?),
            _ => return Err(unknown()),
        };
        Ok(Topic { fleet, device, channel })
    }
}

/// Subscription filters, the only place wildcards are built.
pub mod filter {
    use super::{Name, ROOT};

    /// Every command addressed to one device: `lathe/v1/<fleet>/<device>/cmd/+`.
    pub fn commands(fleet: &Name, device: &Name) -> String {
        format!("{ROOT}/{fleet}/{device}/cmd/+")
    }

    /// Every ack addressed to one device: `lathe/v1/<fleet>/<device>/ack/+`.
    pub fn acks(fleet: &Name, device: &Name) -> String {
        format!("{ROOT}/{fleet}/{device}/ack/+")
    }

    /// Every response from one device: `lathe/v1/<fleet>/<device>/res/+`.
    pub fn responses(fleet: &Name, device: &Name) -> String {
        format!("{ROOT}/{fleet}/{device}/res/+")
    }

    /// Sync batches from every device of every fleet: `lathe/v1/+/+/sync/+`.
    pub fn all_sync() -> String {
        format!("{ROOT}/+/+/sync/+")
    }

    /// Birth and death messages of every device: `lathe/v1/+/+/state`.
    pub fn all_state() -> String {
        format!("{ROOT}/+/+/state")
    }

    /// Health of every device: `lathe/v1/+/+/health`.
    pub fn all_health() -> String {
        format!("{ROOT}/+/+/health")
    }

    /// Events of every device: `lathe/v1/+/+/events`.
    pub fn all_events() -> String {
        format!("{ROOT}/+/+/events")
    }

    /// Whether the MQTT topic filter `f` matches `topic` (MQTT 3.1.1 §4.7: `+` is one level,
    /// a final `#` the rest, including the parent level; a wildcard never matches a first
    /// level that starts with `$`). A shared subscription's filter (`$share/<group>/<filter>`,
    /// MQTT 5 §4.8.2) matches as its `<filter>`.
    pub fn matches(f: &str, topic: &str) -> bool {
        let f = match f.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
            Some((_, inner)) => inner,
            None => f,
        };
        if topic.starts_with('$') && (f.starts_with('+') || f.starts_with('#')) {
            return false;
        }
        let (mut fl, mut tl) = (f.split('/'), topic.split('/'));
        loop {
            match (fl.next(), tl.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Whether an MQTT topic filter could match the root `lathe/v1` or any topic under it.
    pub fn overlaps_root(f: &str) -> bool {
        let mut levels = f.split('/');
        for want in ROOT.split('/') {
            match levels.next() {
                None => return false,
                Some("#") => return true,
                Some("+") => {}
                Some(l) if l == want => {}
                Some(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> Name {
        Name::new(s).expect("valid test name")
    }

    fn check(text: &str, expected: Result<Channel, ()>) {
        match (text.parse::<Topic>(), expected) {
            (Ok(t), Ok(ch)) => {
                assert_eq!(t.channel, ch, "{text}");
                assert_eq!(t.to_string(), text, "round trip of {text}");
            }
            (Err(_), Err(())) => {}
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        for (f, t, want) in [
            ("plant/+/vibration", "plant/press-7/vibration", true),
            ("plant/+/vibration", "plant/press-7/spindle", false),
            ("plant/+/vibration", "plant/a/b/vibration", false),
            ("plant/#", "plant", true),
            ("plant/#", "plant/a/b", true),
            ("#", "plant/a", true),
            ("#", "$SYS/broker", false),
            ("+/a", "$SYS/a", false),
            ("plant/+", "plant/", true),
            ("plant/a", "plant/a/b", false),
            ("plant/a/b", "plant/a", false),
            ("$share/g/plant/+", "plant/a", true),
            ("$share/g/plant/+", "plant/a/b", false),
        ] {
            assert_eq!(filter::matches(f, t), want, "{f} on {t}");
        }
    }

    #[test]
    fn parse_and_format() {
        check("lathe/v1/plant1/press-7/state", Ok(Channel::State));
        check("lathe/v1/plant1/press-7/health", Ok(Channel::Health));
        check("lathe/v1/plant1/press-7/cmd/c1", Ok(Channel::Command(n("c1"))));
        check("lathe/v1/plant1/press-7/res/c1", Ok(Channel::Response(n("c1"))));
        check("lathe/v1/plant1/press-7/pred", Ok(Channel::Predictions));
        check("lathe/v1/plant1/press-7/events", Ok(Channel::Events));
        check(
            "lathe/v1/plant1/press-7/sync/predictions",
            Ok(Channel::Sync(n("predictions"))),
        );
        check("lathe/v1/plant1/press-7/ack/events", Ok(Channel::Ack(n("events"))));
        check("lathe/v2/plant1/press-7/state", Err(()));
        check("lathe/v1/plant1/press-7", Err(()));
        check("lathe/v1/plant1/press-7/cmd", Err(()));
        check("lathe/v1/plant1/press-7/cmd/a/b", Err(()));
        check("lathe/v1/plant1/+/state", Err(()));
        check("lathe/v1//press-7/state", Err(()));
        check("lathe/v1/plant1/press-7/unknown", Err(()));
        check("lathe/v1/plant1/press 7/state", Err(()));
        check("other/v1/plant1/press-7/state", Err(()));
    }

    #[test]
    fn names_are_bounded() {
        assert!(Name::new("a".repeat(64)).is_ok());
        assert!(Name::new("a".repeat(65)).is_err());
        assert!(Name::new("").is_err());
        assert!(Name::new("a#").is_err());
    }

    #[test]
    fn filters_match_their_topics() {
        let (f, d) = (n("f"), n("d"));
        assert_eq!(filter::commands(&f, &d), "lathe/v1/f/d/cmd/+");
        assert_eq!(filter::acks(&f, &d), "lathe/v1/f/d/ack/+");
        assert_eq!(filter::all_sync(), "lathe/v1/+/+/sync/+");
    }

    #[test]
    fn filters_overlapping_the_root_are_recognised() {
        for f in [
            "#",
            "+/#",
            "lathe/#",
            "lathe/v1",
            "lathe/+",
            "+/+/#",
            "lathe/v1/a/b/cmd/+",
            "+/v1/x",
        ] {
            assert!(filter::overlaps_root(f), "{f}");
        }
        for f in [
            "+",
            "sensors/#",
            "lathe",
            "lathe/v2/#",
            "lathe2/#",
            "x/lathe/v1/#",
            "+/v2/#",
        ] {
            assert!(!filter::overlaps_root(f), "{f}");
        }
    }

    fn name_strategy() -> impl Strategy<Value = Name> {
        "[A-Za-z0-9_.-]{1,64}".prop_map(|s| Name::new(s).expect("strategy yields valid names"))
    }

    fn channel_strategy() -> impl Strategy<Value = Channel> {
        prop_oneof![
            Just(Channel::State),
            Just(Channel::Health),
            Just(Channel::Predictions),
            Just(Channel::Events),
            name_strategy().prop_map(Channel::Command),
            name_strategy().prop_map(Channel::Response),
            name_strategy().prop_map(Channel::Sync),
            name_strategy().prop_map(Channel::Ack),
        ]
    }

    proptest! {
        #[test]
        fn topics_round_trip(fleet in name_strategy(), device in name_strategy(), channel in channel_strategy()) {
            let t = Topic { fleet, device, channel };
            let parsed: Topic = t.to_string().parse().expect("formatted topic parses");
            prop_assert_eq!(parsed, t);
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<Topic>();
        }
    }
}
