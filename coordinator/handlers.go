package coordinator

import (
	"strings"

	"github.com/signal-p2p/signal/internal/version"
	"github.com/signal-p2p/signal/protocol"
)

func (c *Coordinator) handleHealth(*call) (any, error) {
	return protocol.Health{Status: "ok", Leader: c.IsLeader(), Version: version.Version}, nil
}

// ClusterStatus is the body of GET /v1/cluster.
type ClusterStatus struct {
	ID           string         `json:"id"`
	State        string         `json:"state"`
	LeaderID     string         `json:"leader_id"`
	Leader       bool           `json:"leader"`
	AppliedIndex uint64         `json:"applied_index"`
	Members      []MemberRecord `json:"members"`
}

func (c *Coordinator) handleCluster(*call) (any, error) {
	_, id := c.raft.LeaderWithID()
	st := ClusterStatus{ID: c.cfg.ID, State: c.raft.State().String(), LeaderID: string(id), Leader: c.IsLeader(), AppliedIndex: c.raft.AppliedIndex()}
	c.fsm.read(func(s *State) { st.Members = s.Members() })
	return st, nil
}

func (c *Coordinator) handleJoin(cl *call) (any, error) {
	var j joinRequest
	if err := decodeJSON(cl.body, &j, false); err != nil {
		return nil, err
	}
	if err := c.addMember(cl.r.Context(), j); err != nil {
		return nil, err
	}
	return map[string]string{"status": "joined"}, nil
}

// handleForwardedAdmission is the leader's end of a follower's
// askLeaderToAdmit.
func (c *Coordinator) handleForwardedAdmission(cl *call) (any, error) {
	var req admissionRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	op, err := c.admitOnLeader(cl.r.Context(), req.PeerID, req.JoinToken)
	if err != nil {
		return nil, err
	}
	return admissionResponse{Operator: op}, nil
}

func (c *Coordinator) handleCreateKey(cl *call) (any, error) {
	var req protocol.CreateKeyRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	return c.createKey(cl.r.Context(), req)
}

func (c *Coordinator) handleListKeys(cl *call) (any, error) {
	return c.listKeys(cl.r.URL.Query().Get("account")), nil
}

func (c *Coordinator) handleRevokeKey(cl *call) (any, error) {
	return c.revokeKey(cl.r.Context(), cl.r.PathValue("id"))
}

func (c *Coordinator) handleCredit(cl *call) (any, error) {
	var req protocol.CreditRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	rec, err := c.credit(cl.r.Context(), req, cl.idem)
	if err != nil {
		return nil, err
	}
	return rawResponse{status: rec.Status, body: rec.Body}, nil
}

func (c *Coordinator) handleJoinToken(cl *call) (any, error) {
	var req protocol.JoinTokenRequest
	if err := decodeJSON(cl.body, &req, true); err != nil {
		return nil, err
	}
	return c.createJoinToken(cl.r.Context(), req)
}

func (c *Coordinator) handleModels(*call) (any, error) { return c.models.list(), nil }

func (c *Coordinator) handleNodes(*call) (any, error) {
	nodes := c.nodesBackend().Nodes()
	out := protocol.NodeList{Nodes: make([]protocol.Node, 0, len(nodes))}
	c.fsm.read(func(s *State) {
		for _, n := range nodes {
			if _, joined := s.Node(n.PeerID); joined {
				// What the network checked of the node, never what its
				// advert claims.
				n.Audits = s.NodeAuditView(n.PeerID)
				out.Nodes = append(out.Nodes, n)
			}
		}
	})
	return out, nil
}

func (c *Coordinator) handleAccount(cl *call) (any, error) {
	var a protocol.Account
	c.fsm.read(func(s *State) {
		a = s.AccountView(cl.account)
		a.Operator = s.OperatorView(cl.account)
	})
	return a, nil
}

func (c *Coordinator) handleTokenize(cl *call) (any, error) {
	var req protocol.TokenizeRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	toks, err := c.tokenize(cl.r.Context(), req)
	if err != nil {
		return nil, err
	}
	return protocol.TokenizeResponse{Tokens: toks}, nil
}

// ---- runs ----

func (c *Coordinator) handleListRuns(cl *call) (any, error) {
	out := protocol.RunList{Runs: []protocol.Run{}}
	c.fsm.read(func(s *State) {
		for _, r := range s.RunsOf(cl.account) {
			out.Runs = append(out.Runs, r.Run)
		}
	})
	return out, nil
}

// ownedRun returns the caller's run named in the path.
func (c *Coordinator) ownedRun(cl *call) (*RunRecord, error) {
	id := cl.r.PathValue("id")
	var rec *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { rec, ok = s.Run(id) })
	if !ok {
		return nil, protocol.UserErrorf(ErrNotFound, "run %q does not exist: GET /v1/runs lists yours", id)
	}
	if rec.Owner != cl.account {
		return nil, protocol.UserErrorf(ErrForbidden, "run %q belongs to another account: use your own runs (GET /v1/runs lists them)", id)
	}
	return rec, nil
}

func (c *Coordinator) handleGetRun(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	return rec.Run, nil
}

func (c *Coordinator) handleRunMetrics(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	return protocol.MetricsResponse{Metrics: append([]protocol.Metrics{}, rec.Metrics...)}, nil
}

func (c *Coordinator) handleCreateRun(cl *call) (any, error) {
	var req protocol.CreateRunRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	run, err := c.createRun(cl.r.Context(), cl.account, &req)
	if err != nil {
		return nil, err
	}
	return created{run}, nil
}

func (c *Coordinator) handleEndRun(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	return c.endRun(cl.r.Context(), rec)
}

func (c *Coordinator) handleLoadState(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	if err := runUsable(rec, c.cfg.RetryAfter); err != nil {
		return nil, err
	}
	var req protocol.LoadStateRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	return c.loadState(cl, rec, req)
}

// handleLiftQuarantine is POST /v1/admin/nodes/{peer}/lift_quarantine: an
// admin's decision (a failed audit the operator showed was the network's
// fault, an operator who fixed its machine) recorded with its reason.
func (c *Coordinator) handleLiftQuarantine(cl *call) (any, error) {
	var req protocol.LiftQuarantineRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if strings.TrimSpace(req.Reason) == "" || len(req.Reason) > 500 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "field reason: say why the quarantine is lifted, in 1 to 500 characters")
	}
	peer := cl.r.PathValue("peer")
	if _, err := c.propose(cl.r.Context(), cmdLiftQuarantine, liftQuarantineCmd{PeerID: peer, Reason: req.Reason, Time: now()}); err != nil {
		return nil, err
	}
	var v *protocol.NodeAudits
	c.fsm.read(func(s *State) { v = s.NodeAuditView(peer) })
	return v, nil
}
