//! Scenario tests organised by the Raft paper's sections (and the thesis
//! for reads, transfer and membership). Each test opens with its goal.

mod cluster;

use bytes::Bytes;
use cluster::{is_append_to, n, Cluster};
use regatta_raft::{
    CommitBroadcast, ConfChange, Config, EntryPayload, Error, LogIndex, MemStorage, Membership,
    Message, MessageBody, NodeId, Proposed, RaftNode, ReadId, ReadMode, Refusal, RequestId, Role,
    SnapshotMeta, Term,
};

fn no_pre_vote(config: &mut Config) {
    config.pre_vote = false;
    config.check_quorum = false;
}

fn leader_of(cluster: &Cluster) -> Option<u64> {
    cluster
        .nodes
        .iter()
        .find(|(_, node)| node.role() == Role::Leader)
        .map(|(id, _)| id.0)
}

// ---------------------------------------------------------------------------
// §5.2 Leader election

mod election {
    use super::*;

    /// §5.2: a single-node cluster elects itself on timeout and commits a
    /// proposal as soon as it is persisted.
    #[test]
    fn single_node_cluster_elects_itself_and_commits() {
        let mut c = Cluster::new(&[1]);
        c.tick_all(20);
        assert_eq!(c.role(1), Role::Leader);
        c.propose(1, "a").expect("leader accepts");
        c.settle();
        assert_eq!(c.applied_commands(1), vec!["a"]);
    }

    /// §5.2: an election makes one leader; the others follow it in its term.
    #[test]
    fn election_makes_one_leader_that_others_follow() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        assert_eq!(c.term(1), Term(2));
        for id in [2, 3] {
            assert_eq!(c.role(id), Role::Follower);
            assert_eq!(c.nodes[&n(id)].leader(), Some(n(1)));
            assert_eq!(c.term(id), Term(2));
        }
    }

    /// §5.2: randomized timeouts elect a leader with no outside help.
    #[test]
    fn randomized_timeouts_elect_a_leader() {
        let mut c = Cluster::new(&[1, 2, 3, 4, 5]);
        c.tick_all(40);
        let leaders = c
            .nodes
            .values()
            .filter(|node| node.role() == Role::Leader)
            .count();
        assert_eq!(leaders, 1);
    }

    fn vote_request(from: u64, to: u64, term: u64, last_index: u64, last_term: u64) -> Message {
        Message {
            from: n(from),
            to: n(to),
            term: Term(term),
            body: MessageBody::Vote {
                pre_vote: false,
                last_index: LogIndex(last_index),
                last_term: Term(last_term),
                transfer: false,
            },
        }
    }

    fn vote_answers(node: &mut RaftNode<MemStorage>) -> Vec<bool> {
        let ready = node.ready().expect("ready");
        assert!(
            ready.messages.is_empty(),
            "a vote must wait for persistence"
        );
        ready
            .persisted_messages
            .iter()
            .filter_map(|message| match message.body {
                MessageBody::VoteResponse { granted, .. } => Some(granted),
                _ => None,
            })
            .collect()
    }

    /// §5.2: a node votes at most once per term, and only after persisting.
    #[test]
    fn a_node_votes_once_per_term() {
        let mut c = Cluster::with_config(&[1, 2, 3], no_pre_vote);
        let node = c.node(3);
        node.step(vote_request(1, 3, 2, 1, 1)).expect("step");
        assert_eq!(vote_answers(node), vec![true]);
        node.step(vote_request(2, 3, 2, 1, 1)).expect("step");
        assert_eq!(vote_answers(node), vec![false]);
        assert_eq!(node.status().hard_state.vote, Some(n(1)));
    }

    /// §5.4.1: a vote goes only to a candidate whose log is at least as up
    /// to date as the voter's.
    #[test]
    fn no_vote_for_a_candidate_with_a_stale_log() {
        let mut c = Cluster::with_config(&[1, 2, 3], no_pre_vote);
        c.elect(1);
        c.isolate(3);
        c.propose(1, "x").expect("leader");
        c.settle();
        c.heal();
        let node = c.node(2);
        let stale = vote_request(3, 2, 9, 2, 2);
        node.step(stale).expect("step");
        assert_eq!(vote_answers(node), vec![false]);
        c.node(3).campaign();
        c.settle();
        assert_ne!(c.role(3), Role::Leader);
    }

    /// §9.6 PreVote: an isolated node keeps campaigning without raising its
    /// term, so it does not depose the leader when it returns.
    #[test]
    fn pre_vote_keeps_an_isolated_node_from_raising_its_term() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let term = c.term(1);
        c.isolate(3);
        for _ in 0..100 {
            c.tick(3);
            c.settle();
        }
        assert_eq!(c.term(3), term);
        c.heal();
        c.tick_all(30);
        assert_eq!(c.role(1), Role::Leader);
        assert_eq!(c.term(1), term);
    }

    /// §6.2 CheckQuorum: a leader that stops hearing from a quorum steps
    /// down within an election timeout.
    #[test]
    fn check_quorum_makes_an_isolated_leader_step_down() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.isolate(1);
        for _ in 0..20 {
            c.tick(1);
            c.settle();
        }
        assert_eq!(c.role(1), Role::Follower);
    }

    /// §4.2.3 stickiness: a follower that hears from a live leader ignores
    /// (pre-)vote requests; the leader keeps its term.
    #[test]
    fn followers_ignore_votes_while_the_leader_is_alive() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let term = c.term(1);
        let answers_before = c.count_delivered("pre_vote_response");
        c.node(3).campaign();
        c.settle();
        assert_eq!(c.count_delivered("pre_vote_response"), answers_before);
        c.tick_all(3);
        assert_eq!(c.role(1), Role::Leader);
        assert_eq!(c.term(1), term);
    }
}

// ---------------------------------------------------------------------------
// §5.3 Log replication

mod replication {
    use super::*;

    /// §5.3: committed entries are applied in the same order everywhere.
    #[test]
    fn entries_commit_and_apply_in_order_on_every_node() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        for command in ["a", "b", "c"] {
            c.propose(1, command).expect("leader");
        }
        c.settle();
        c.tick_all(1);
        for id in [1, 2, 3] {
            assert_eq!(c.applied_commands(id), vec!["a", "b", "c"], "node {id}");
        }
    }

    /// Proposals of one batch of input (no `ready` in between) leave in one
    /// append per follower carrying all of them, not one append each; and
    /// every follower answers once.
    #[test]
    fn proposals_of_one_batch_share_one_append_per_follower() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.settle();
        let (before, answers) = (c.delivered.len(), c.count_delivered("append_response"));
        for i in 0..10 {
            let command = Bytes::from(format!("batched-{i}"));
            c.node(1).propose(vec![command]).expect("leader");
        }
        c.settle();
        let carried: Vec<usize> = c.delivered[before..]
            .iter()
            .filter_map(|message| match &message.body {
                MessageBody::Append { entries, .. } if !entries.is_empty() => Some(entries.len()),
                _ => None,
            })
            .collect();
        assert_eq!(carried, [10, 10], "one append per follower, with all ten");
        assert_eq!(c.count_delivered("append_response") - answers, 2);
        c.tick_all(1);
        for id in [1, 2, 3] {
            assert_eq!(c.applied_commands(id).len(), 10, "node {id}");
        }
    }

    /// A batch of proposals larger than one message leaves at once in as
    /// many appends as it needs, each within the limit, without waiting
    /// for answers; and a full window stops it until answers come.
    #[test]
    fn a_batch_larger_than_one_message_is_split_within_the_window() {
        fn small_messages(config: &mut Config) {
            config.message_size_bytes_max = 200;
            config.inflight_messages_max = 3;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], small_messages);
        c.elect(1);
        c.settle();
        for i in 0..10 {
            let command = Bytes::from(format!("{i:064}"));
            c.node(1).propose(vec![command]).expect("leader");
        }
        c.process(n(1));
        let sent: Vec<usize> = c
            .queue
            .iter()
            .filter(|message| is_append_to(message, 2))
            .filter_map(|message| match &message.body {
                MessageBody::Append { entries, .. } => Some(entries.len()),
                _ => None,
            })
            .collect();
        // 88 bytes an entry, 200 a message: two each, three in flight.
        assert_eq!(sent, [2, 2, 2], "the window holds three appends");
        c.settle();
        c.tick_all(1);
        for id in [1, 2, 3] {
            assert_eq!(c.applied_commands(id).len(), 10, "node {id}");
        }
    }

    /// §5.3: a follower's conflicting uncommitted suffix is overwritten by
    /// the new leader's log.
    #[test]
    fn a_conflicting_suffix_is_overwritten() {
        let mut c = Cluster::with_config(&[1, 2, 3], no_pre_vote);
        c.elect(1);
        c.isolate(1);
        c.propose(1, "lost-1").expect("leader");
        c.propose(1, "lost-2").expect("leader");
        c.settle();
        c.elect(2);
        c.propose(2, "kept").expect("leader");
        c.settle();
        c.heal();
        c.tick_all(2);
        assert_eq!(c.role(1), Role::Follower);
        assert_eq!(c.applied_commands(1), vec!["kept"]);
        assert_eq!(c.last_index(1), c.last_index(2));
    }

    /// §5.3 (optimisation): a rejection carries the conflicting term, so the
    /// leader skips a whole divergent term in one round trip instead of one
    /// index at a time.
    #[test]
    fn fast_back_off_skips_a_divergent_term() {
        let mut c = Cluster::with_config(&[1, 2, 3], no_pre_vote);
        c.elect(3);
        c.isolate(3);
        for i in 0..50 {
            c.propose(3, &format!("divergent-{i}")).expect("leader");
        }
        c.settle();
        c.elect(1);
        for i in 0..50 {
            c.propose(1, &format!("kept-{i}")).expect("leader");
        }
        c.settle();
        c.heal();
        let before = c.delivered.len();
        c.tick_all(3);
        let appends_to_3 = c.delivered[before..]
            .iter()
            .filter(|message| is_append_to(message, 3))
            .count();
        assert!(appends_to_3 <= 6, "took {appends_to_3} appends to converge");
        assert_eq!(c.last_index(3), c.last_index(1));
        assert_eq!(c.applied_commands(3).len(), 50);
    }

    /// Appends respect `message_size_bytes_max` (one entry always fits).
    #[test]
    fn appends_respect_the_message_size_limit() {
        fn small_messages(config: &mut Config) {
            config.message_size_bytes_max = 200;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], small_messages);
        c.elect(1);
        c.isolate(3);
        for i in 0..10 {
            c.propose(1, &format!("{i:064}")).expect("leader");
        }
        c.settle();
        c.heal();
        let before = c.delivered.len();
        c.tick_all(3);
        let mut catch_up_appends = 0;
        for message in &c.delivered[before..] {
            if let MessageBody::Append { entries, .. } = &message.body {
                let bytes: u64 = entries.iter().map(|entry| entry.size_bytes()).sum();
                assert!(
                    entries.len() <= 1 || bytes <= 200,
                    "append of {bytes} bytes"
                );
                catch_up_appends += usize::from(message.to == n(3) && !entries.is_empty());
            }
        }
        assert!(
            catch_up_appends >= 5,
            "10 entries of 88 bytes need 5 appends"
        );
        assert_eq!(c.applied_commands(3).len(), 10);
    }

    /// Steady state: an entry costs one append and one answer per follower;
    /// the append that then carries the new commit index is answered by
    /// nobody, yet every follower applies the entry.
    #[test]
    fn a_commit_only_append_needs_no_answer() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "warm-up").expect("leader");
        c.settle();
        let before = c.delivered.len();
        c.propose(1, "x").expect("leader");
        c.settle();
        let delivered = &c.delivered[before..];
        let quiet_appends = delivered
            .iter()
            .filter(|m| {
                matches!(&m.body, MessageBody::Append { entries, wants_ack: false, .. } if entries.is_empty())
            })
            .count();
        let answers = delivered
            .iter()
            .filter(|m| matches!(m.body, MessageBody::AppendResponse { .. }))
            .count();
        assert_eq!(quiet_appends, 2, "one commit-only append per follower");
        assert_eq!(answers, 2, "only the appends with the entry are answered");
        for id in [1, 2, 3] {
            assert_eq!(c.applied_commands(id), vec!["warm-up", "x"], "node {id}");
        }
    }

    /// Three nodes under `CommitBroadcast::Deferred`, node 1 elected and
    /// its first commit broadcast.
    fn deferred_cluster() -> Cluster {
        fn deferred_commit(config: &mut Config) {
            config.commit_broadcast = CommitBroadcast::Deferred;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], deferred_commit);
        c.elect(1);
        c.node(1).broadcast_commit();
        c.settle();
        c
    }

    fn commit_only_appends(messages: &[Message]) -> Vec<NodeId> {
        messages
            .iter()
            .filter(
                |m| matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty()),
            )
            .map(|m| m.to)
            .collect()
    }

    /// `CommitBroadcast::Deferred`: the commit index of the last entry
    /// reaches the followers only when the runtime asks, in one append
    /// each; the next entry's append carries it too.
    #[test]
    fn a_deferred_commit_waits_for_the_runtime_or_the_next_append() {
        let mut c = deferred_cluster();
        let before = c.delivered.len();
        c.propose(1, "x").expect("leader");
        c.settle();
        assert!(commit_only_appends(&c.delivered[before..]).is_empty());
        assert!(c.node(1).commit_unsent());
        for id in [2, 3] {
            assert!(
                !c.applied_commands(id).contains(&"x".to_string()),
                "node {id}"
            );
        }
        // The next entry carries the commit of the first.
        c.propose(1, "y").expect("leader");
        c.settle();
        for id in [2, 3] {
            assert_eq!(c.applied_commands(id), vec!["x"], "node {id}");
        }
        // The runtime's broadcast sends the rest, once per follower.
        let before = c.delivered.len();
        c.node(1).broadcast_commit();
        c.settle();
        assert_eq!(
            commit_only_appends(&c.delivered[before..]),
            vec![n(2), n(3)]
        );
        assert!(!c.node(1).commit_unsent());
        for id in [2, 3] {
            assert_eq!(c.applied_commands(id), vec!["x", "y"], "node {id}");
        }
    }

    /// Under `Deferred`, a follower that forwarded a proposal hears of its
    /// commit at once (its proposer waits for it to apply); the other
    /// follower does not.
    #[test]
    fn a_deferred_commit_reaches_the_follower_that_forwarded_at_once() {
        let mut c = deferred_cluster();
        let before = c.delivered.len();
        assert!(matches!(
            c.propose(2, "forwarded"),
            Ok(Proposed::Forwarded { .. })
        ));
        c.settle();
        assert_eq!(commit_only_appends(&c.delivered[before..]), vec![n(2)]);
        assert_eq!(c.applied_commands(2), vec!["forwarded"]);
        assert!(c.applied_commands(3).is_empty());
    }

    /// Under `Deferred`, a follower's read needs no commit-only append:
    /// the read round's heartbeats carry the commit index to every
    /// follower that holds the entries, and the deferred broadcast then
    /// has nothing left to send.
    #[test]
    fn a_read_round_carries_the_deferred_commit() {
        let mut c = deferred_cluster();
        c.propose(1, "x").expect("leader");
        c.settle();
        assert!(c.applied_commands(2).is_empty(), "the commit is deferred");
        let before = c.delivered.len();
        c.read(2, 9).expect("forwarded");
        c.settle();
        let reads = c.confirmed_reads(2);
        assert_eq!(reads.len(), 1, "{reads:?}");
        assert_eq!(reads[0].index, c.commit(1));
        for id in [2, 3] {
            assert_eq!(c.applied_commands(id), vec!["x"], "node {id}");
        }
        c.node(1).broadcast_commit();
        c.settle();
        assert!(
            commit_only_appends(&c.delivered[before..]).is_empty(),
            "{:?}",
            &c.delivered[before..]
        );
    }

    /// Under `Deferred`, a follower that forwarded a read but lacked the
    /// entries when the read round's heartbeat reached it hears of the
    /// commit with the read's answer, not when the runtime's timer fires:
    /// it serves the read only once it has applied the read index.
    #[test]
    fn a_deferred_commit_reaches_a_lagging_reader_at_once() {
        let mut c = deferred_cluster();
        c.propose(1, "x").expect("leader");
        // Node 3 acknowledges the entry, which commits it; node 2's append
        // is held back.
        let mut held = Vec::new();
        while let Some(message) = c.queue.pop_front() {
            if is_append_to(&message, 2) {
                held.push(message);
                continue;
            }
            let to = message.to;
            c.node(to.0).step(message).expect("step");
            c.process(to);
        }
        assert_eq!(held.len(), 1);
        assert!(c.commit(1) > c.commit(2));
        c.read(2, 9).expect("forwarded");
        // The held append reaches node 2 after its read left.
        c.queue.extend(held);
        c.settle();
        let reads = c.confirmed_reads(2);
        assert_eq!(reads.len(), 1, "{reads:?}");
        assert!(c.commit(2) >= reads[0].index, "{reads:?}");
        assert_eq!(c.applied_commands(2), vec!["x"]);
    }

    /// Answers that move the commit index several times within one batch of
    /// input cost one commit-carrying append per follower, not one per
    /// advance.
    #[test]
    fn commit_advances_in_one_batch_are_sent_once() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "warm-up").expect("leader");
        c.settle();
        c.propose(1, "a").expect("leader");
        c.propose(1, "b").expect("leader");
        // Deliver the appends; keep the followers' answers.
        let mut answers = Vec::new();
        while let Some(message) = c.queue.pop_front() {
            if message.to == n(1) {
                answers.push(message);
                continue;
            }
            let to = message.to;
            c.node(to.0).step(message).expect("step");
            c.process(to);
        }
        assert_eq!(answers.len(), 4, "two appends to each of two followers");
        for answer in answers {
            c.node(1).step(answer).expect("step");
        }
        c.process(n(1));
        let commit_appends = c
            .queue
            .iter()
            .filter(
                |m| matches!(&m.body, MessageBody::Append { entries, .. } if entries.is_empty()),
            )
            .count();
        assert_eq!(commit_appends, 2, "one per follower: {:?}", c.queue);
        c.settle();
        for id in [1, 2, 3] {
            assert_eq!(
                c.applied_commands(id),
                vec!["warm-up", "a", "b"],
                "node {id}"
            );
        }
    }

    /// A follower that lost an append answers the commit-only append that
    /// follows with a rejection, and the leader sends the entry again at
    /// once, without waiting for a heartbeat.
    #[test]
    fn a_lost_append_is_repaired_through_the_quiet_append() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "warm-up").expect("leader");
        c.settle();
        c.propose(1, "x").expect("leader");
        c.drop_queued(|m| is_append_to(m, 3));
        c.settle();
        assert_eq!(c.applied_commands(3), vec!["warm-up", "x"]);
        assert_eq!(c.last_index(3), c.last_index(1));
    }

    /// Flow control: at most `inflight_messages_max` appends are in flight to
    /// a follower that does not answer.
    #[test]
    fn the_inflight_window_bounds_unacknowledged_appends() {
        fn window_of_three(config: &mut Config) {
            config.inflight_messages_max = 3;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], window_of_three);
        c.elect(1);
        c.blocked.insert((n(2), n(1)));
        let before = c.delivered.len();
        for i in 0..10 {
            c.propose(1, &format!("p{i}")).expect("leader");
            c.settle();
        }
        let to_2 = c.delivered[before..]
            .iter()
            .filter(|m| matches!(&m.body, MessageBody::Append { entries, .. } if !entries.is_empty() && m.to == n(2)))
            .count();
        assert_eq!(to_2, 3);
    }

    /// Proposals are refused with a distinct error once the uncommitted
    /// tail passes `uncommitted_size_bytes_max`, and accepted again after
    /// it commits.
    #[test]
    fn the_uncommitted_size_limit_refuses_proposals() {
        fn small_uncommitted(config: &mut Config) {
            config.uncommitted_size_bytes_max = 1000;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], small_uncommitted);
        c.elect(1);
        c.isolate(1);
        let payload = "x".repeat(100);
        let mut accepted = 0;
        let error = loop {
            match c.propose(1, &payload) {
                Ok(_) => accepted += 1,
                Err(error) => break error,
            }
            assert!(accepted < 100, "the limit never applied");
        };
        assert!(matches!(
            error,
            Error::UncommittedSizeExceeded {
                limit_bytes: 1000,
                ..
            }
        ));
        assert_eq!(accepted, 8);
        c.heal();
        c.tick_all(2);
        assert!(c.propose(1, &payload).is_ok());
    }

    /// With nothing uncommitted, one entry over the limit still goes (it
    /// could never go otherwise), but a batch over it does not: a peer's
    /// forwarded batch cannot append without bound. Empty entries, which
    /// count toward no limit, are Raft's own and cannot be proposed.
    #[test]
    fn batches_over_the_limit_and_empty_entries_are_refused() {
        fn small_uncommitted(config: &mut Config) {
            config.uncommitted_size_bytes_max = 1000;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], small_uncommitted);
        c.elect(1);
        c.settle();
        let half = Bytes::from("h".repeat(600));
        let batch = c.node(1).propose(vec![half.clone(), half]);
        assert!(
            matches!(batch, Err(Error::UncommittedSizeExceeded { .. })),
            "{batch:?}"
        );
        let single = c.node(1).propose(vec![Bytes::from("s".repeat(2000))]);
        assert!(single.is_ok(), "{single:?}");
        c.settle();
        let before = c.last_index(1);
        let forwarded = Message {
            from: NodeId(2),
            to: NodeId(1),
            term: c.node(1).term(),
            body: MessageBody::Propose {
                payloads: vec![EntryPayload::Empty; 1000],
            },
        };
        let _ = c.node(1).step(forwarded);
        c.settle();
        assert_eq!(
            c.last_index(1),
            before,
            "forwarded empty entries were appended"
        );
    }

    /// Messages that only the leader, or a voter, may send are ignored
    /// from anyone else: a TimeoutNow from a node that is not the leader
    /// (it deposed a healthy leader past its lease), a transfer vote from
    /// a non-voter at a higher term (it passed the lease), and a heartbeat
    /// answer naming a read round not begun yet (it confirmed future
    /// reads without asking). An append whose previous entry has term 0
    /// past index 0 cannot be true and is dropped.
    #[test]
    fn what_only_the_leader_or_a_voter_may_send_is_ignored_from_others() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(1)
            .propose(vec![Bytes::from_static(b"x")])
            .expect("leader");
        c.settle();
        let term = c.term(2);

        // A TimeoutNow from node 3, a follower like node 2.
        let timeout_now = Message {
            from: NodeId(3),
            to: NodeId(2),
            term,
            body: MessageBody::TimeoutNow,
        };
        let _ = c.node(2).step(timeout_now);
        c.settle();
        assert_eq!(c.term(2), term, "node 2 campaigned on node 3's word");
        assert_eq!(c.role(1), Role::Leader);

        // A transfer vote from node 9, in no membership, at a higher term.
        let vote = Message {
            from: NodeId(9),
            to: NodeId(2),
            term: Term(term.0 + 5),
            body: MessageBody::Vote {
                last_index: LogIndex(1 << 40),
                last_term: Term(term.0 + 5),
                pre_vote: false,
                transfer: true,
            },
        };
        let _ = c.node(2).step(vote);
        c.settle();
        assert_eq!(
            c.term(2),
            term,
            "a non-voter's transfer vote passed the lease"
        );
        assert_eq!(c.role(1), Role::Leader);

        // An append with a previous entry of term 0 past index 0 leaves the
        // follower's log as it was and gets no answer.
        let last = c.last_index(2);
        let append = Message {
            from: NodeId(1),
            to: NodeId(2),
            term,
            body: MessageBody::Append {
                prev_index: last,
                prev_term: Term(0),
                entries: Vec::new(),
                commit: LogIndex(0),
                wants_ack: true,
            },
        };
        let answers = c.count_delivered("append_response");
        let _ = c.node(2).step(append);
        c.settle();
        assert_eq!(c.last_index(2), last);
        assert_eq!(c.count_delivered("append_response"), answers);

        // Node 1 is cut off with a read under way; node 2 claims to have
        // answered every read round, this one and all later ones. Counted,
        // the claim makes node 1 and node 2 a quorum for reads node 1 can
        // no longer confirm.
        c.isolate(1);
        c.read(1, 7).expect("still leader");
        let claim = Message {
            from: NodeId(2),
            to: NodeId(1),
            term,
            body: MessageBody::HeartbeatResponse { round: u64::MAX },
        };
        let _ = c.node(1).step(claim);
        c.settle();
        c.read(1, 8).expect("still leader");
        c.settle();
        assert!(
            c.confirmed_reads(1).is_empty(),
            "a read was confirmed by a round node 2 never answered"
        );
    }

    /// A snapshot message from a peer whose metadata cannot be true (a
    /// term above the message's, index 0 or near `u64::MAX`, no voters) is
    /// dropped: it used to be installed and trip the invariant check (a
    /// log term above the current term), stopping every group on the
    /// worker, or to overflow the log's index arithmetic.
    #[test]
    fn malformed_snapshot_metadata_is_dropped() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(1)
            .propose(vec![Bytes::from_static(b"x")])
            .expect("leader");
        c.settle();
        let term = c.node(2).term();
        let last = c.last_index(2);
        let voters = Membership::with_voters([NodeId(1), NodeId(2), NodeId(3)]);
        let bad = [
            SnapshotMeta {
                index: LogIndex(last.0 + 100),
                term: Term(term.0 + 1),
                membership: voters.clone(),
            },
            SnapshotMeta {
                index: LogIndex(u64::MAX),
                term,
                membership: voters.clone(),
            },
            SnapshotMeta {
                index: LogIndex(0),
                term,
                membership: voters.clone(),
            },
            SnapshotMeta {
                index: LogIndex(last.0 + 100),
                term,
                membership: Membership::default(),
            },
        ];
        for meta in bad {
            let message = Message {
                from: NodeId(1),
                to: NodeId(2),
                term,
                body: MessageBody::Snapshot { meta: meta.clone() },
            };
            let _ = c.node(2).step(message);
            assert_eq!(c.last_index(2), last, "installed {meta:?}");
        }
        // The group still works.
        c.node(1)
            .propose(vec![Bytes::from_static(b"y")])
            .expect("leader");
        c.settle();
        assert_eq!(c.last_index(2), LogIndex(last.0 + 1));
    }

    /// §5.3 with asynchronous persistence: the leader sends appends before
    /// its own fsync, commits on two followers' acknowledgements alone, but
    /// hands an entry out for applying only once it is durable locally.
    #[test]
    fn the_leader_replicates_before_persisting() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(1)
            .propose(vec![Bytes::from_static(b"async")])
            .expect("leader");
        let ready = c.node(1).ready().expect("ready");
        assert_eq!(ready.entries.len(), 1);
        let appends: Vec<Message> = ready.messages.clone();
        assert_eq!(
            appends.len(),
            2,
            "appends go out before the leader persists"
        );
        for message in appends {
            let to = message.to;
            c.node(to.0).step(message).expect("step");
            c.process(to);
        }
        while let Some(message) = c.queue.pop_front() {
            c.node(message.to.0).step(message).expect("step");
        }
        let commit = c.commit(1);
        assert_eq!(commit, ready.entries[0].index, "followers alone commit it");
        let early = c.node(1).ready().expect("ready");
        assert!(
            early.committed_entries.is_empty(),
            "not applied before it is durable here"
        );
        let node = c.node(1);
        node.storage_mut().append(&ready.entries);
        node.storage_mut()
            .set_hard_state(ready.hard_state.unwrap_or_default());
        node.on_persisted(ready.number);
        let late = node.ready().expect("ready");
        assert_eq!(late.committed_entries.len(), 1);
    }

    /// Followers forward proposals to the leader.
    #[test]
    fn a_follower_forwards_proposals() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let proposed = c.propose(2, "via-follower").expect("forwarded");
        assert_eq!(proposed, Proposed::Forwarded { leader: n(1) });
        c.settle();
        assert_eq!(c.applied_commands(1), vec!["via-follower"]);
    }

    /// A forwarded proposal that is not appended is answered, so that its
    /// caller on the follower hears why at once instead of waiting out its
    /// timeout: a node that is not the leader names the one it knows.
    #[test]
    fn a_forwarded_proposal_to_a_node_that_is_not_leader_is_answered() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let id = RequestId {
            client: 7,
            sequence: 1,
        };
        // Node 2 still believes node 3 leads (a stale leader hint).
        c.node(3)
            .step(Message {
                from: n(2),
                to: n(3),
                term: Term(0),
                body: MessageBody::Propose {
                    payloads: vec![EntryPayload::Session {
                        id,
                        command: Bytes::from_static(b"x"),
                    }],
                },
            })
            .expect("step");
        c.settle();
        assert_eq!(
            c.refused[&n(2)],
            vec![(
                id,
                Error::NotLeader {
                    leader_hint: Some(n(1))
                }
            )]
        );
        assert!(c.applied_commands(1).is_empty());
    }

    /// A forwarded read that reaches a node that is not the leader (the
    /// follower's leader hint is stale) is answered with the leader that
    /// node knows, so the follower's caller retries there at once instead
    /// of waiting out its timeout. Reads refused alike share one message.
    #[test]
    fn a_forwarded_read_to_a_node_that_is_not_leader_is_answered() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(3)
            .step(Message {
                from: n(2),
                to: n(3),
                term: Term(0),
                body: MessageBody::ReadIndex {
                    ids: vec![ReadId(4), ReadId(5)],
                },
            })
            .expect("step");
        let ready = c.node(3).ready().expect("ready");
        let refusals: Vec<&Message> = ready
            .messages
            .iter()
            .filter(|message| matches!(message.body, MessageBody::ReadRefused { .. }))
            .collect();
        assert_eq!(refusals.len(), 1, "{:?}", ready.messages);
        for message in ready.messages.into_iter().chain(ready.persisted_messages) {
            c.node(message.to.0).step(message).expect("step");
        }
        c.settle();
        let not_leader = Error::NotLeader {
            leader_hint: Some(n(1)),
        };
        assert_eq!(
            c.refused_reads[&n(2)],
            vec![(ReadId(4), not_leader.clone()), (ReadId(5), not_leader)]
        );
        assert!(c.reads.get(&n(2)).is_none_or(|reads| reads.is_empty()));
    }

    /// Reads forwarded by a node outside the membership (a removed node,
    /// or anyone who reached the peer port) get neither an answer nor a
    /// refusal; nor does a refusal sent by one touch this node's reads.
    #[test]
    fn forwarded_reads_and_refusals_from_non_members_are_ignored() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(1)
            .step(Message {
                from: n(9),
                to: n(1),
                term: Term(0),
                body: MessageBody::ReadIndex {
                    ids: vec![ReadId(4)],
                },
            })
            .expect("step");
        let ready = c.node(1).ready().expect("ready");
        assert!(
            !ready
                .messages
                .iter()
                .chain(&ready.persisted_messages)
                .any(|message| message.to == n(9)),
            "{:?}",
            ready.messages
        );
        c.node(2)
            .step(Message {
                from: n(9),
                to: n(2),
                term: Term(0),
                body: MessageBody::ReadRefused {
                    ids: vec![ReadId(4)],
                    refusal: Refusal::NotLeader { leader_hint: None },
                },
            })
            .expect("step");
        let ready = c.node(2).ready().expect("ready");
        assert!(ready.refused_reads.is_empty(), "{:?}", ready.refused_reads);
    }

    /// A leader over `pending_reads_max` confirms the forwarded reads it
    /// can take and refuses the rest as overloaded; the follower's
    /// callers of those hear it at once.
    #[test]
    fn a_leader_over_its_pending_reads_limit_refuses_forwarded_reads() {
        fn one_pending_read(config: &mut Config) {
            config.pending_reads_max = 1;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], one_pending_read);
        c.elect(1);
        c.node(2).read_index(ReadId(1)).expect("forwarded");
        c.node(2).read_index(ReadId(2)).expect("forwarded");
        c.settle();
        let confirmed: Vec<ReadId> = c.reads[&n(2)].iter().map(|state| state.id).collect();
        assert_eq!(confirmed, vec![ReadId(1)]);
        let refused = &c.refused_reads[&n(2)];
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, ReadId(2));
        let Error::LeaderOverloaded { reason } = &refused[0].1 else {
            panic!("{:?}", refused[0].1);
        };
        assert!(reason.contains("pending_reads_max 1"), "{reason}");
    }

    /// A leader whose state machine falls `apply_backlog_entries_max`
    /// entries behind its commit index takes no proposal, its own or a
    /// forwarded one, until it catches up (etcd's "too many requests");
    /// the follower that forwarded one hears it at once.
    #[test]
    fn a_leader_behind_on_applies_refuses_proposals_until_it_catches_up() {
        fn small_backlog(config: &mut Config) {
            config.apply_backlog_entries_max = 2;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], small_backlog);
        c.elect(1);
        c.applies_held.insert(n(1));
        for command in ["a", "b", "c"] {
            c.propose(1, command).expect("under the limit");
            c.settle();
        }
        let error = c.propose(1, "d").expect_err("over the limit");
        assert!(
            matches!(
                error,
                Error::ApplyBacklog {
                    limit_entries: 2,
                    ..
                }
            ),
            "{error}"
        );
        let id = RequestId {
            client: 7,
            sequence: 1,
        };
        c.node(2)
            .propose_with_id(id, Bytes::from_static(b"e"))
            .expect("forwarded");
        c.settle();
        let refused = &c.refused[&n(2)];
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, id);
        let Error::LeaderOverloaded { reason } = &refused[0].1 else {
            panic!("{:?}", refused[0].1);
        };
        assert!(reason.contains("apply_backlog_entries_max 2"), "{reason}");
        // A membership change still goes: a cluster whose state machine
        // is behind must be able to replace a member (etcd's limit holds
        // back client writes only).
        c.node(1)
            .propose_conf_change(ConfChange::AddLearner {
                node: n(4),
                auto_promote: false,
            })
            .expect("a membership change passes the limit");
        c.settle();
        c.release_applies(1);
        c.propose(1, "f").expect("caught up");
        c.settle();
        assert_eq!(c.applied_commands(2), vec!["a", "b", "c", "f"]);
    }

    /// Without forwarding, a follower names the leader; with no leader, the
    /// error says so.
    #[test]
    fn not_leader_errors_carry_the_leader_hint() {
        fn no_forwarding(config: &mut Config) {
            config.forward_to_leader = false;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], no_forwarding);
        let error = c.propose(1, "x").expect_err("no leader yet");
        assert_eq!(error, Error::NotLeader { leader_hint: None });
        c.elect(1);
        let error = c.propose(2, "x").expect_err("not leader");
        assert_eq!(
            error,
            Error::NotLeader {
                leader_hint: Some(n(1))
            }
        );
        assert!(error.to_string().contains("the leader is node 1"));
    }
}

// ---------------------------------------------------------------------------
// §5.4 Safety

mod safety {
    use super::*;

    fn one_entry_per_append(config: &mut Config) {
        no_pre_vote(config);
        config.message_size_bytes_max = 1;
    }

    /// §5.4.2 (Figure 8): a leader never commits an entry of an earlier term
    /// by counting replicas; it commits it only through an entry of its own
    /// term stored on a majority.
    #[test]
    fn figure_8_no_commit_of_earlier_terms_by_counting() {
        let mut c = Cluster::with_config(&[1, 2, 3, 4, 5], one_entry_per_append);
        c.elect(1); // Term 2; its no-op (index 2) commits everywhere.
        for other in [3, 4, 5] {
            c.blocked.insert((n(1), n(other)));
        }
        c.propose(1, "x").expect("leader"); // Index 3, term 2, on S1 and S2.
        c.settle();
        let s1 = c.stop(1);
        // S5 wins term 3 with S3 and S4, appends index 3 of term 3, crashes.
        c.heal();
        c.node(5).campaign();
        c.process_all();
        while c.role(5) != Role::Leader {
            assert!(c.deliver_one(), "S5 should win");
        }
        let _ = c.stop(5);
        c.queue
            .retain(|message| message.from != n(5) && message.to != n(5));
        // S1 returns and wins term 4.
        c.restart(1, s1);
        // Its first campaign lands in term 3, where S3 and S4 voted already.
        for _attempt in 0..3 {
            c.node(1).campaign();
            c.process_all();
            while c.role(1) != Role::Leader && c.deliver_one() {}
            if c.role(1) == Role::Leader {
                break;
            }
        }
        assert_eq!(c.role(1), Role::Leader, "S1 should win");
        let own_index = c.last_index(1);
        let own_term = c.term(1);
        while c.deliver_one() {
            if c.commit(1) >= LogIndex(3) {
                let holders = c
                    .nodes
                    .values()
                    .filter(|node| node.log_term(own_index) == Some(own_term))
                    .count();
                assert!(
                    holders >= 3,
                    "index 3 (term 2) committed while the term-{own_term} entry is on {holders} nodes"
                );
            }
        }
        assert!(c.commit(1) >= own_index);
    }

    /// §5.4.2: a new leader appends an empty entry of its term at once.
    #[test]
    fn a_new_leader_appends_a_no_op() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(2);
        let applied = &c.applied[&n(2)];
        let last = applied.last().expect("the no-op is applied");
        assert_eq!(last.payload, EntryPayload::Empty);
        assert_eq!(last.term, c.term(2));
    }

    /// A restart keeps term, vote and log, and does not re-apply entries.
    #[test]
    fn a_restart_keeps_term_vote_and_log() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "a").expect("leader");
        c.settle();
        let before = c.nodes[&n(2)].status();
        let storage = c.stop(2);
        c.restart(2, storage);
        let after = c.nodes[&n(2)].status();
        assert_eq!(after.hard_state.term, before.hard_state.term);
        assert_eq!(after.hard_state.vote, before.hard_state.vote);
        assert_eq!(after.last_index, before.last_index);
        assert!(
            !c.node(2).has_ready()
                || c.node(2)
                    .ready()
                    .expect("ready")
                    .committed_entries
                    .is_empty()
        );
    }
}

// ---------------------------------------------------------------------------
// §6 (paper) / §4 (thesis) Cluster membership changes

mod membership {
    use super::*;

    fn change(c: &mut Cluster, at: u64, change: ConfChange) -> regatta_raft::Result<Proposed> {
        let result = c.node(at).propose_conf_change(change);
        c.process(n(at));
        result
    }

    fn voters(c: &Cluster, id: u64) -> Vec<u64> {
        c.nodes[&n(id)]
            .status()
            .membership
            .voters
            .iter()
            .map(|n| n.0)
            .collect()
    }

    /// Proposes, on node 1, to add node 4 as a learner.
    fn add_learner_4(c: &mut Cluster, auto_promote: bool) -> regatta_raft::Result<Proposed> {
        change(
            c,
            1,
            ConfChange::AddLearner {
                node: n(4),
                auto_promote,
            },
        )
    }

    /// Nodes 1 to 3 with 1 leading, one command applied, and node 4 added
    /// as a learner (not promoted automatically) that has caught up.
    fn with_caught_up_learner_4() -> Cluster {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "before").expect("leader");
        c.settle();
        c.add_empty(4);
        add_learner_4(&mut c, false).expect("accepted");
        c.settle();
        c.tick_all(30);
        c
    }

    /// Thesis §4.2.1: a node joins as a learner, catches up without voting,
    /// and is promoted to voter.
    #[test]
    fn add_learner_catch_up_then_promote() {
        let mut c = with_caught_up_learner_4();
        assert_eq!(c.applied_commands(4), vec!["before"]);
        assert!(c.nodes[&n(4)].status().membership.learners.contains(&n(4)));
        assert_eq!(c.role(4), Role::Follower, "a learner never campaigns");
        change(&mut c, 1, ConfChange::Promote { node: n(4) }).expect("caught up");
        c.settle();
        assert_eq!(voters(&c, 1), vec![1, 2, 3, 4]);
        assert_eq!(voters(&c, 4), vec![1, 2, 3, 4]);
    }

    /// A transfer to a learner just promoted, before the other voters
    /// appended its promotion: they see a learner's campaign, and grant
    /// its transfer flag all the same (a vote does not consult the
    /// configuration, thesis §4.2.3). Refused while in their lease, the
    /// group had no leader until the leases ran out.
    #[test]
    fn a_transfer_to_a_just_promoted_learner_wins_at_once() {
        let mut c = with_caught_up_learner_4();
        // Only node 4 receives its promotion.
        c.cut(1, 2);
        c.cut(1, 3);
        change(&mut c, 1, ConfChange::Promote { node: n(4) }).expect("caught up");
        c.settle();
        assert_eq!(voters(&c, 4), vec![1, 2, 3, 4]);
        assert_eq!(voters(&c, 2), vec![1, 2, 3]);
        c.node(1).transfer_leader(n(4)).expect("started");
        c.settle();
        assert_eq!(c.role(4), Role::Leader, "the transfer campaign lost");
    }

    /// A learner marked for automatic promotion becomes a voter once caught up.
    #[test]
    fn auto_promotion_after_catch_up() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.add_empty(4);
        add_learner_4(&mut c, true).expect("accepted");
        c.settle();
        c.tick_all(3);
        assert_eq!(voters(&c, 1), vec![1, 2, 3, 4]);
    }

    /// A learner that acknowledged everything before the leader could
    /// commit it is still promoted once the group goes idle: the commit
    /// reaches it in an append that wants no answer, so only heartbeat
    /// answers and the commit itself can start the promotion.
    #[test]
    fn auto_promotion_when_the_learner_was_ahead_of_the_commit() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "before").expect("proposed");
        c.settle();
        c.add_empty(4);
        // The voters are cut off: the learner receives and acknowledges
        // the change that adds it, but the leader cannot commit it yet.
        c.cut(1, 2);
        c.cut(1, 3);
        add_learner_4(&mut c, true).expect("accepted");
        c.settle();
        assert_eq!(c.last_index(4), c.last_index(1), "the learner holds it");
        assert!(c.commit(1) < c.last_index(1), "not committed yet");
        c.heal();
        for _ in 0..5 {
            c.tick_all(5);
            c.settle();
        }
        assert_eq!(voters(&c, 1), vec![1, 2, 3, 4]);
    }

    /// Promoting a learner that has not caught up is refused clearly.
    #[test]
    fn promoting_a_lagging_learner_is_refused() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.add_empty(4);
        c.cut(1, 4);
        add_learner_4(&mut c, false).expect("accepted");
        c.settle();
        let error = change(&mut c, 1, ConfChange::Promote { node: n(4) }).expect_err("lagging");
        assert!(error.to_string().contains("has not caught up"), "{error}");
    }

    /// Thesis §4.1: one change at a time; the next waits for the commit.
    #[test]
    fn one_change_at_a_time() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.cut(1, 2);
        c.cut(1, 3);
        change(
            &mut c,
            1,
            ConfChange::AddLearner {
                node: n(4),
                auto_promote: false,
            },
        )
        .expect("first");
        let error = change(
            &mut c,
            1,
            ConfChange::AddLearner {
                node: n(5),
                auto_promote: false,
            },
        )
        .expect_err("second");
        assert!(error.to_string().contains("not yet committed"), "{error}");
    }

    /// A change that leaves no voter, or a quorum it cannot reach, is refused.
    #[test]
    fn unsafe_changes_are_refused() {
        let mut c = Cluster::new(&[1]);
        c.tick_all(20);
        let error = change(&mut c, 1, ConfChange::Remove { node: n(1) }).expect_err("last voter");
        assert!(error.to_string().contains("zero voters"), "{error}");
        let error = change(&mut c, 1, ConfChange::Demote { node: n(1) }).expect_err("last voter");
        assert!(error.to_string().contains("zero voters"), "{error}");

        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let _ = c.stop(3);
        for _ in 0..25 {
            c.tick(1);
            c.settle();
        }
        let error = change(&mut c, 1, ConfChange::Remove { node: n(2) }).expect_err("quorum");
        assert!(error.to_string().contains("reachable"), "{error}");
        change(&mut c, 1, ConfChange::Remove { node: n(3) })
            .expect("removing the dead node is fine");
        c.settle();
        assert_eq!(voters(&c, 1), vec![1, 2]);
    }

    /// CheckQuorum clears every peer's "heard from" flag at the end of each
    /// election timeout. A change proposed in the moment after, before any
    /// peer answered again, still sees the peers it heard from in the last
    /// interval as reachable. (CI once refused a learner here with "only 1
    /// of 3 voters are reachable" on a healthy three-node group.)
    #[test]
    fn a_change_right_after_a_quorum_check_sees_the_peers_it_just_heard() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.settle();
        let timeout = c.config_for(n(1), &[]).election_timeout_ticks;
        // Tick the leader through one check without delivering anything:
        // the check passes (the peers answered the election) and clears
        // the flags; the heartbeats it sends are still queued.
        for _ in 0..timeout {
            c.tick(1);
        }
        assert_eq!(c.role(1), Role::Leader);
        change(
            &mut c,
            1,
            ConfChange::AddLearner {
                node: n(4),
                auto_promote: false,
            },
        )
        .expect("the peers answered within the last interval");
        // Two silent intervals later they count as unreachable again.
        c.isolate(1);
        for _ in 0..timeout {
            c.tick(1);
        }
        assert_ne!(c.role(1), Role::Leader, "check quorum steps down");
    }

    /// Removing the leader hands leadership to another voter, and the old
    /// leader learns that it was removed (shutdown-on-remove signal).
    #[test]
    fn removing_the_leader_hands_over_leadership() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        change(&mut c, 1, ConfChange::Remove { node: n(1) }).expect("accepted");
        c.settle();
        c.tick_all(2);
        let leader = leader_of(&c).expect("a new leader");
        assert_ne!(leader, 1);
        assert!(c.nodes[&n(1)].status().soft_state.removed);
        assert_eq!(voters(&c, leader), vec![2, 3]);
        c.propose(leader, "after").expect("new leader works");
        c.settle();
        assert_eq!(c.applied_commands(leader), vec!["after"]);
    }

    /// Leave-on-terminate: a follower asks to remove itself.
    #[test]
    fn a_node_can_leave() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(3).leave().expect("forwarded");
        c.settle();
        c.tick_all(1);
        assert_eq!(voters(&c, 1), vec![1, 2]);
        assert!(c.nodes[&n(3)].status().soft_state.removed);
    }

    /// A removed node still knows it was removed after a restart, while
    /// its log holds the membership it was in (shutdown-on-remove fires
    /// again instead of leaving it running as a non-member).
    #[test]
    fn a_removal_is_remembered_across_a_restart() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.node(3).leave().expect("forwarded");
        c.settle();
        c.tick_all(1);
        assert!(c.nodes[&n(3)].status().soft_state.removed);
        let storage = c.stop(3);
        c.restart(3, storage);
        assert!(
            c.nodes[&n(3)].status().soft_state.removed,
            "forgotten at restart"
        );
    }

    /// Thesis §4.2.3: a removed node that never learnt of its removal
    /// campaigns, but cannot disrupt the cluster.
    #[test]
    fn a_removed_node_does_not_disrupt() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.isolate(3);
        change(&mut c, 1, ConfChange::Remove { node: n(3) }).expect("accepted");
        c.settle();
        let term = c.term(1);
        c.heal();
        c.tick_all(60);
        assert_eq!(c.role(1), Role::Leader);
        assert_eq!(c.term(1), term);
    }

    /// A node that joins starts empty and learns the membership from the
    /// leader.
    #[test]
    fn a_joining_node_learns_the_membership() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.add_empty(4);
        assert!(c.nodes[&n(4)].status().membership.voters.is_empty());
        add_learner_4(&mut c, false).expect("accepted");
        c.settle();
        c.tick_all(2);
        assert_eq!(voters(&c, 4), vec![1, 2, 3]);
    }

    /// The unsafe override: a survivor of a group that lost its quorum
    /// removes the dead voters locally and carries on alone.
    #[test]
    fn force_remove_recovers_a_group_that_lost_quorum() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "before").expect("leader");
        c.settle();
        let _ = c.stop(2);
        let _ = c.stop(3);
        for _ in 0..30 {
            c.tick(1);
        }
        assert_ne!(c.role(1), Role::Leader, "no quorum, no leader");
        c.node(1).force_remove(n(2)).expect("forced");
        c.node(1).force_remove(n(3)).expect("forced");
        c.process(n(1));
        c.tick_all(30);
        assert_eq!(c.role(1), Role::Leader);
        assert_eq!(voters(&c, 1), vec![1]);
        c.propose(1, "after").expect("leader");
        c.settle();
        assert_eq!(c.applied_commands(1), vec!["before", "after"]);
    }

    /// Only members forward to the leader: a proposal from a node outside
    /// the membership (a removed one, or anyone who reached the peer port)
    /// is dropped, not appended.
    #[test]
    fn a_forwarded_proposal_from_a_non_member_is_dropped() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let before = c.last_index(1);
        for from in [2, 9] {
            c.node(1)
                .step(Message {
                    from: n(from),
                    to: n(1),
                    term: Term(0),
                    body: MessageBody::Propose {
                        payloads: vec![EntryPayload::Normal(Bytes::from(format!("from {from}")))],
                    },
                })
                .expect("step");
        }
        c.settle();
        assert_eq!(c.last_index(1), before.next(), "the member's only");
        assert_eq!(c.applied_commands(1), vec!["from 2"]);
    }

    /// Thesis errata (single-server changes): a new leader changes the
    /// membership only after an entry of its own term commits, also when
    /// its whole log was committed when it won. Otherwise its first entry
    /// could commit under the new membership's quorum alone, while a
    /// leader of the old membership, elected by a disjoint majority,
    /// overwrites it.
    #[test]
    fn a_new_leader_changes_membership_only_after_its_first_entry_commits() {
        let mut c = Cluster::new(&[1, 2, 3, 4]);
        assert_eq!(c.commit(2), c.last_index(2), "the whole log is committed");
        let committed = c.commit(2);
        c.node(2).campaign();
        c.process_all();
        while c.role(2) != Role::Leader {
            assert!(c.deliver_one());
        }
        // Its first entry reaches node 3 only: 2 of 4 voters hold it, one
        // short of a quorum; node 3 is reachable, so a removal of node 4
        // would keep a reachable quorum of the new membership.
        c.cut(2, 1);
        c.cut(2, 4);
        c.settle();
        assert_eq!(c.commit(2), committed, "its first entry is not committed");
        let error = change(&mut c, 2, ConfChange::Remove { node: n(4) })
            .expect_err("before its first entry commits");
        assert!(error.to_string().contains("not yet committed"), "{error}");
        c.heal();
        c.tick_all(3);
        c.settle();
        assert!(c.commit(2) > committed, "its first entry committed");
        change(&mut c, 2, ConfChange::Remove { node: n(4) }).expect("accepted now");
        c.settle();
        assert_eq!(voters(&c, 2), vec![1, 2, 3]);
    }

    /// A lone voter wins its election without asking anyone, so nothing
    /// has waited for its new term to be durable. Its appends to learners
    /// leave only after that: sent before, a crash could make it forget
    /// the term, win it again and send other entries at the same index
    /// and term, and the learner would keep the first ones.
    #[test]
    fn a_lone_voter_sends_nothing_in_a_term_before_the_term_is_durable() {
        let mut c = Cluster::new(&[1]);
        c.elect(1);
        c.add_empty(2);
        change(
            &mut c,
            1,
            ConfChange::AddLearner {
                node: n(2),
                auto_promote: false,
            },
        )
        .expect("accepted");
        c.settle();
        let storage = c.stop(1);
        c.restart(1, storage);
        c.node(1).campaign();
        assert_eq!(c.role(1), Role::Leader);
        let ready = c.node(1).ready().expect("ready");
        let term = ready.hard_state.as_ref().expect("the new term").term;
        assert_eq!(term, c.term(1));
        assert!(
            !ready.messages.iter().any(|m| m.to == n(2)),
            "left before the term was durable: {:?}",
            ready.messages
        );
        assert!(
            ready.persisted_messages.iter().any(|m| is_append_to(m, 2)),
            "sent once the term is durable: {:?}",
            ready.persisted_messages
        );
        // Once it is, the leader's messages leave before its fsync again.
        let node = c.node(1);
        node.storage_mut().append(&ready.entries);
        if let Some(hard_state) = ready.hard_state {
            node.storage_mut().set_hard_state(hard_state);
        }
        node.on_persisted(ready.number);
        c.queue.extend(ready.persisted_messages);
        c.settle();
        let node = c.node(1);
        node.propose(vec![Bytes::from("after")]).expect("leader");
        let ready = node.ready().expect("ready");
        assert!(
            ready.messages.iter().any(|m| is_append_to(m, 2)),
            "{:?}",
            ready.messages
        );
    }
}

// ---------------------------------------------------------------------------
// §7 Log compaction

mod compaction {
    use super::*;

    /// §7: a follower that needs compacted entries receives a snapshot,
    /// installs it (with its membership) and then follows the log again.
    #[test]
    fn a_lagging_follower_catches_up_through_a_snapshot() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.isolate(3);
        for i in 0..20 {
            c.propose(1, &format!("e{i}")).expect("leader");
        }
        c.settle();
        let applied = c.nodes[&n(1)].status().applied;
        let meta = c.nodes[&n(1)].snapshot_meta_at(applied).expect("meta");
        assert_eq!(
            meta.membership.voters.len(),
            3,
            "the snapshot carries the membership"
        );
        c.node(1).storage_mut().create_snapshot(meta.clone());
        c.heal();
        c.tick_all(3);
        assert_eq!(c.count_delivered("snapshot"), 1);
        let status = c.nodes[&n(3)].status();
        assert_eq!(status.first_index, meta.index.next());
        assert_eq!(status.membership, meta.membership);
        c.propose(1, "after").expect("leader");
        c.settle();
        c.tick_all(1);
        assert_eq!(c.last_index(3), c.last_index(1));
        assert_eq!(c.applied_commands(3), vec!["after"]);
    }
}

// ---------------------------------------------------------------------------
// §8 (paper) / §6 (thesis) Client interaction: reads and leadership transfer

mod client {
    use super::*;

    /// A follower's heartbeat answers and forwarded requests do not wait
    /// for its disk. With an append still unpersisted in the same `Ready`,
    /// the append's answer waits for the fsync; the heartbeat answer of a
    /// read round and the follower's own forwarded read leave at once, so
    /// a busy disk does not slow linearizable reads.
    #[test]
    fn heartbeat_answers_and_forwarded_reads_leave_before_the_fsync() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.settle();
        c.propose(1, "x").expect("leader");
        c.read(1, 5).expect("leader");
        let to_node_2: Vec<Message> = c.queue.iter().filter(|m| m.to == n(2)).cloned().collect();
        c.queue.retain(|m| m.to != n(2));
        assert!(to_node_2.iter().any(
            |m| matches!(&m.body, MessageBody::Append { entries, .. } if !entries.is_empty())
        ));
        assert!(to_node_2
            .iter()
            .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
        for message in to_node_2 {
            c.node(2).step(message).expect("step");
        }
        c.node(2).read_index(ReadId(6)).expect("forwarded");
        let ready = c.node(2).ready().expect("ready");
        assert!(!ready.entries.is_empty(), "the append is not yet durable");
        let kinds = |messages: &[Message]| -> Vec<&'static str> {
            messages.iter().map(|m| m.body.kind_name()).collect()
        };
        let now = kinds(&ready.messages);
        let later = kinds(&ready.persisted_messages);
        assert!(now.contains(&"heartbeat_response"), "{now:?}");
        assert!(now.contains(&"read_index"), "{now:?}");
        assert!(!now.contains(&"append_response"), "{now:?}");
        assert!(later.contains(&"append_response"), "{later:?}");
        assert!(!later.contains(&"heartbeat_response"), "{later:?}");
    }

    /// Thesis §6.4: ReadIndex answers only after a heartbeat round, and one
    /// round confirms every read queued while the previous one was in flight.
    #[test]
    fn read_index_batches_reads_per_heartbeat_round() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let before = c.count_delivered("heartbeat");
        c.read(1, 1).expect("leader");
        assert!(c.confirmed_reads(1).is_empty(), "not before a round");
        for read in 2..=10 {
            c.read(1, read).expect("leader");
        }
        c.settle();
        let confirmed = c.confirmed_reads(1);
        assert_eq!(confirmed.len(), 10);
        assert!(confirmed.iter().all(|read| read.index == c.commit(1)));
        let rounds = (c.count_delivered("heartbeat") - before) / 2;
        assert_eq!(
            rounds, 2,
            "read 1 starts a round; reads 2..10 share the next"
        );
    }

    /// Thesis §6.4: a new leader answers reads only after an entry of its
    /// own term commits.
    #[test]
    fn reads_wait_for_the_leader_to_commit_in_its_term() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.node(1).campaign();
        c.process_all();
        while c.role(1) != Role::Leader {
            assert!(c.deliver_one());
        }
        let no_op_index = c.last_index(1);
        c.read(1, 7).expect("leader");
        assert!(c.confirmed_reads(1).is_empty());
        c.settle();
        let confirmed = c.confirmed_reads(1);
        assert_eq!(confirmed.len(), 1);
        assert!(confirmed[0].index >= no_op_index);
    }

    /// Followers forward reads to the leader and get its commit index back.
    #[test]
    fn a_follower_read_is_forwarded() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "x").expect("leader");
        c.settle();
        c.read(2, 5).expect("forwarded");
        c.settle();
        let confirmed = c.confirmed_reads(2);
        assert_eq!(confirmed.len(), 1);
        assert_eq!(confirmed[0].id, ReadId(5));
        assert_eq!(confirmed[0].index, c.commit(1));
    }

    /// Thesis §6.4.1: with the lease, the leader answers at once while a
    /// quorum acknowledged a recent heartbeat, and not after the lease ends.
    #[test]
    fn lease_reads_hold_only_while_the_lease_does() {
        fn lease(config: &mut Config) {
            config.read_mode = ReadMode::LeaseBased;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], lease);
        c.tick_all(10);
        c.elect(1);
        c.tick_all(2);
        c.read(1, 1).expect("leader");
        assert_eq!(c.confirmed_reads(1).len(), 1, "answered without a round");
        c.isolate(1);
        for _ in 0..9 {
            c.tick(1);
            c.settle();
        }
        c.read(1, 2).expect("still leader");
        c.settle();
        assert_eq!(
            c.confirmed_reads(1).len(),
            1,
            "no answer once the lease ran out"
        );
    }

    /// Found by the simulation (seed 3219282): once TimeoutNow has gone
    /// out, its target may campaign at any time, past stickiness, even
    /// after the transfer is aborted. The old leader must not serve lease
    /// reads for the rest of the term; ReadIndex rounds still work.
    #[test]
    fn no_lease_reads_after_a_timeout_now_in_the_term() {
        fn lease(config: &mut Config) {
            config.read_mode = ReadMode::LeaseBased;
        }
        let mut c = Cluster::with_config(&[1, 2, 3], lease);
        c.tick_all(10);
        c.elect(1);
        c.tick_all(2);
        c.read(1, 1).expect("leader");
        assert_eq!(c.confirmed_reads(1).len(), 1, "the lease holds");
        c.node(1).transfer_leader(n(2)).expect("started");
        c.process(n(1));
        // The TimeoutNow is lost (or merely delayed): the transfer aborts.
        c.drop_queued(|message| message.body == MessageBody::TimeoutNow);
        for _ in 0..12 {
            c.tick(1);
            c.settle();
        }
        assert_eq!(c.role(1), Role::Leader);
        c.read(1, 2).expect("leader");
        assert_eq!(
            c.confirmed_reads(1).len(),
            1,
            "no lease read after TimeoutNow"
        );
        c.settle();
        assert_eq!(
            c.confirmed_reads(1).len(),
            2,
            "a ReadIndex round answers it"
        );
    }

    /// A transfer to a node that just restarted (it knows no leader yet:
    /// the TimeoutNow comes before any append or heartbeat) goes through:
    /// the target takes it from a voter while it knows no leader.
    #[test]
    fn a_transfer_to_a_node_that_just_restarted_goes_through() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.propose(1, "x").expect("leader");
        c.settle();
        let storage = c.stop(2);
        c.restart(2, storage);
        c.node(1).transfer_leader(n(2)).expect("started");
        c.settle();
        assert_eq!(c.role(2), Role::Leader, "the transfer stalled");
    }

    /// Thesis §3.10: leadership moves to the chosen node, catching it up
    /// first; proposals are refused meanwhile.
    #[test]
    fn leadership_transfer_to_a_lagging_node() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.isolate(3);
        for i in 0..5 {
            c.propose(1, &format!("e{i}")).expect("leader");
        }
        c.settle();
        c.heal();
        c.node(1).transfer_leader(n(3)).expect("started");
        let error = c.propose(1, "during").expect_err("refused during transfer");
        assert!(matches!(error, Error::TransferInProgress { target } if target == n(3)));
        c.settle();
        assert_eq!(c.role(3), Role::Leader);
        assert_eq!(c.last_index(3), c.last_index(1));
    }

    /// A transfer that cannot complete is abandoned after an election
    /// timeout, and the leader accepts proposals again.
    #[test]
    fn a_stuck_transfer_is_aborted() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.cut(1, 3);
        c.node(1).transfer_leader(n(3)).expect("started");
        assert!(c.propose(1, "x").is_err());
        for _ in 0..12 {
            c.tick(1);
            c.settle();
        }
        assert_eq!(c.role(1), Role::Leader);
        assert!(c.propose(1, "x").is_ok());
    }

    /// Transfer requests to non-voters are refused; a follower forwards them.
    #[test]
    fn transfer_requests_are_validated_and_forwarded() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        let error = c.node(1).transfer_leader(n(9)).expect_err("not a voter");
        assert!(error.to_string().contains("not a voter"));
        c.node(2).transfer_leader(n(2)).expect("forwarded");
        c.settle();
        assert_eq!(c.role(2), Role::Leader);
    }

    /// Step-down before shutdown picks the most up-to-date voter.
    #[test]
    fn step_down_hands_over_to_a_caught_up_voter() {
        let mut c = Cluster::new(&[1, 2, 3]);
        c.elect(1);
        c.cut(1, 2);
        c.propose(1, "x").expect("leader");
        c.settle();
        c.node(1).step_down().expect("started");
        c.settle();
        assert_eq!(c.role(3), Role::Leader);
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// Invalid configurations are refused at construction, naming the field.
#[test]
fn invalid_configurations_name_the_field() {
    type Case = (fn(&mut Config), &'static str);
    let cases: Vec<Case> = vec![
        (|c| c.id = NodeId(0), "id"),
        (|c| c.election_timeout_ticks = 1, "election_timeout_ticks"),
        (
            |c| c.heartbeat_interval_ticks = 0,
            "heartbeat_interval_ticks",
        ),
        (|c| c.message_size_bytes_max = 0, "message_size_bytes_max"),
        (|c| c.inflight_messages_max = 0, "inflight_messages_max"),
        (
            |c| c.uncommitted_size_bytes_max = 0,
            "uncommitted_size_bytes_max",
        ),
        (|c| c.pending_reads_max = 0, "pending_reads_max"),
        (
            |c| c.apply_backlog_entries_max = 0,
            "apply_backlog_entries_max",
        ),
        (
            |c| {
                c.read_mode = ReadMode::LeaseBased;
                c.check_quorum = false;
            },
            "check_quorum",
        ),
        (|c| c.initial_voters = vec![NodeId(1), NodeId(1)], "twice"),
        (
            |c| c.initial_voters = vec![NodeId(2)],
            "must include this node",
        ),
    ];
    for (mutate, expected) in cases {
        let mut config = Config::new(NodeId(1));
        mutate(&mut config);
        let error = match RaftNode::new(config, MemStorage::new()) {
            Ok(_) => panic!("accepted a config that should mention {expected}"),
            Err(error) => error,
        };
        assert!(matches!(error, Error::InvalidConfig(_)));
        assert!(
            error.to_string().contains(expected),
            "{error} lacks {expected}"
        );
    }
}
