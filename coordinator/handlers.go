package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sync"

	"github.com/signal-p2p/signal/internal/version"
	"github.com/signal-p2p/signal/protocol"
)

// Request limits named in 400 messages.
const (
	maxNameLen         = 200
	maxCredits         = 1 << 53 // keeps amounts exact in JSON clients that use doubles
	maxLoRARank        = 256
	maxLoRAAlpha       = 4096
	maxCheckpointEvery = 1_000_000
	maxBatchItems      = 4096
	maxPrompts         = 1024
	maxNumSamples      = 64
)

var allModules = []string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

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

func (c *Coordinator) handleRegisterNode(cl *call) (any, error) {
	var req registerNodeRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	op, err := c.registerNode(cl.r.Context(), req.PeerID, req.JoinToken)
	if err != nil {
		return nil, err
	}
	return registerNodeResponse{Operator: op}, nil
}

func (c *Coordinator) handleCreateKey(cl *call) (any, error) {
	var req protocol.CreateKeyRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if req.Credits < 0 || req.Credits > maxCredits {
		return nil, fmt.Errorf("field credits: %d out of range 0..%d: %w", req.Credits, int64(maxCredits), ErrInvalidRequest)
	}
	if len(req.Name) > maxNameLen {
		return nil, fmt.Errorf("field name: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	key := newSecret("sk-sig-")
	acct := "acct_" + newID(8)
	rec := KeyRecord{Hash: hashSecret(key), Account: acct, Name: req.Name, CreatedAt: now()}
	if _, err := c.propose(cl.r.Context(), cmdCreateKey, createKeyCmd{Key: rec, Credits: req.Credits}); err != nil {
		return nil, err
	}
	c.log.Info("api key created", "category", "security", "account", acct, "credits", req.Credits)
	return protocol.CreateKeyResponse{APIKey: key, Account: acct}, nil
}

func (c *Coordinator) handleCredit(cl *call) (any, error) {
	var req protocol.CreditRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if req.Account == "" {
		return nil, fmt.Errorf("field account: required: %w", ErrInvalidRequest)
	}
	if req.Amount <= 0 || req.Amount > maxCredits {
		return nil, fmt.Errorf("field amount: %d out of range 1..%d: %w", req.Amount, int64(maxCredits), ErrInvalidRequest)
	}
	v, err := c.propose(cl.r.Context(), cmdMint, mintCmd{Account: req.Account, Amount: req.Amount, Idem: cl.idem, Time: now()})
	if err != nil {
		return nil, err
	}
	rec := v.(IdemRecord)
	c.log.Info("account credited", "category", "billing", "account", req.Account, "amount", req.Amount)
	return rawResponse{status: rec.Status, body: rec.Body, recorded: true}, nil
}

func (c *Coordinator) handleJoinToken(cl *call) (any, error) {
	var req protocol.JoinTokenRequest
	if err := decodeJSON(cl.body, &req, true); err != nil {
		return nil, err
	}
	if len(req.OperatorAccount) > maxNameLen {
		return nil, fmt.Errorf("field operator_account: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	op := req.OperatorAccount
	if op == "" {
		op = "op_" + newID(8)
	}
	tok := newSecret("jt-")
	if _, err := c.propose(cl.r.Context(), cmdCreateJoinToken, JoinTokenRecord{Hash: hashSecret(tok), Operator: op, CreatedAt: now()}); err != nil {
		return nil, err
	}
	return protocol.JoinTokenResponse{JoinToken: tok, OperatorAccount: op}, nil
}

func (c *Coordinator) handleModels(*call) (any, error) { return c.models.list(), nil }

func (c *Coordinator) handleNodes(*call) (any, error) {
	nodes := c.nodesBackend().Nodes()
	out := protocol.NodeList{Nodes: make([]protocol.Node, 0, len(nodes))}
	for _, n := range nodes {
		if c.IsJoined(n.PeerID) {
			out.Nodes = append(out.Nodes, n)
		}
	}
	return out, nil
}

func (c *Coordinator) handleAccount(cl *call) (any, error) {
	var a protocol.Account
	c.fsm.read(func(s *State) { a = s.AccountView(cl.account) })
	return a, nil
}

var tokenizers sync.Map // model path -> Tokenizer

// tokenizer returns a model's tokenizer, loaded once per path; nil when this
// coordinator has none for it.
func (c *Coordinator) tokenizer(m ModelSpec) (Tokenizer, error) {
	if c.cfg.LoadTokenizer == nil || m.Path == "" {
		return nil, nil
	}
	if t, ok := tokenizers.Load(m.Path); ok {
		return t.(Tokenizer), nil
	}
	tk, err := c.cfg.LoadTokenizer(m.Path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer for %s: %w", m.Name, err)
	}
	t, _ := tokenizers.LoadOrStore(m.Path, tk)
	return t.(Tokenizer), nil
}

// textCounter counts texts with the model's tokenizer where this member has
// it, so text examples are billed by their tokens, not bounded by bytes.
func (c *Coordinator) textCounter(m ModelSpec) textCounter {
	t, err := c.tokenizer(m)
	if err != nil || t == nil {
		return nil
	}
	return func(text string) int64 { return int64(len(t.Encode(text, false))) }
}

// maxTokenizeBytes bounds one /v1/tokenize text: the leader tokenizes it
// in memory, and a context's worth of text is far below this.
const maxTokenizeBytes = 1 << 20

func (c *Coordinator) handleTokenize(cl *call) (any, error) {
	var req protocol.TokenizeRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if len(req.Text) > maxTokenizeBytes {
		return nil, fmt.Errorf("field text: %d bytes, at most %d; split it into several calls: %w", len(req.Text), maxTokenizeBytes, ErrInvalidRequest)
	}
	m, err := c.models.get(req.BaseModel)
	if err != nil {
		return nil, err
	}
	t, err := c.tokenizer(m)
	if err != nil {
		return nil, err
	}
	if t == nil {
		return nil, retryAfter(fmt.Errorf("no tokenizer for model %s on this coordinator: %w", m.Name, ErrUnavailable), c.cfg.RetryAfter)
	}
	select {
	case c.tokenizeSlots <- struct{}{}:
		defer func() { <-c.tokenizeSlots }()
	case <-cl.r.Context().Done():
		return nil, fmt.Errorf("client gone while waiting to tokenize: %w", cl.r.Context().Err())
	}
	toks := t.Encode(req.Text, req.AddSpecialTokens)
	if toks == nil {
		toks = []int{}
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
		return nil, fmt.Errorf("run %q: %w", id, ErrNotFound)
	}
	if rec.Owner != cl.account {
		return nil, fmt.Errorf("run %q belongs to another account: %w", id, ErrForbidden)
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
	spec, model, err := c.validateCreateRun(&req)
	if err != nil {
		return nil, err
	}
	ctx := cl.r.Context()
	// Refuse before recording a run that could not be placed anywhere.
	if _, err := c.place(model, nil); err != nil {
		var open int
		c.fsm.read(func(s *State) {
			for _, r := range s.RunsOf(cl.account) {
				if isActive(r.Run.Status) {
					open++
				}
			}
		})
		if open > 0 {
			err = fmt.Errorf("%w; you hold %d open runs (DELETE /v1/runs/{id} frees one)", err, open)
		}
		return nil, retryAfter(err, c.cfg.RetryAfter)
	}
	spec.RunID = "run_" + newID(8)
	rec := RunRecord{
		Run: protocol.Run{ID: spec.RunID, Name: req.Name, BaseModel: spec.BaseModel, LoRARank: spec.LoRARank,
			LoRAAlpha: spec.LoRAAlpha, TargetModules: spec.TargetModules, Status: protocol.RunStarting,
			CheckpointEvery: spec.CheckpointEvery, CreatedAt: now()},
		Owner: cl.account, Seed: spec.Seed, LRSchedule: spec.LRSchedule, LastActive: now(),
	}
	if _, err := c.propose(ctx, cmdCreateRunLimited, createRunLimitedCmd{Run: rec, MaxActive: c.cfg.MaxRunsPerAccount, MinAvailable: c.cfg.MinRunBalance}); err != nil {
		if errors.Is(err, ErrTooManyRuns) {
			err = retryAfter(err, c.cfg.RetryAfter)
		}
		return nil, err
	}
	run, err := c.openSession(ctx, spec, model, nil, false, map[string]bool{})
	if err != nil {
		// The run exists; record why it has no session.
		_, _ = c.propose(context.WithoutCancel(ctx), cmdUpdateRun, RunUpdate{RunID: spec.RunID, Status: protocol.RunFailed, Time: now()})
		return nil, err
	}
	return created{run.Run}, nil
}

// openSession places spec on a node (not in exclude), sends init and marks
// the run ready there. It tries further nodes when one is lost.
// When moved is set the run restarts at the checkpoint's step (0 without
// one) and records it as resumed_from_step.
func (c *Coordinator) openSession(ctx context.Context, spec protocol.SessionSpec, model ModelSpec, resume *protocol.Checkpoint, moved bool, exclude map[string]bool) (*RunRecord, error) {
	spec.ResumeFrom = resume
	body, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		node, err := c.place(model, exclude)
		if err != nil {
			if lastErr != nil {
				err = fmt.Errorf("%w (last node error: %v)", err, lastErr)
			}
			return nil, retryAfter(err, c.cfg.RetryAfter)
		}
		peer := node.PeerID
		if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: spec.RunID, Node: &peer, Time: now()}); err != nil {
			return nil, err
		}
		resp, err := c.nodesBackend().Do(ctx, peer, protocol.SessionRequest{RequestID: spec.RunID + "/init/" + newID(4), RunID: spec.RunID, Call: protocol.CallInit, Body: body})
		if err == nil && resp.Error != nil {
			err = nodeError(resp.Error)
			if !errors.Is(err, ErrUnavailable) {
				return nil, err
			}
		}
		if err != nil {
			if errors.Is(err, ErrNodeLost) || errors.Is(err, ErrUnavailable) {
				exclude[peer] = true
				lastErr = err
				continue
			}
			return nil, fmt.Errorf("init run %s on %s: %w", spec.RunID, peer, err)
		}
		u := RunUpdate{RunID: spec.RunID, Status: protocol.RunReady, Time: now()}
		if moved {
			step := 0
			if resume != nil {
				step = resume.Step
			}
			u.Step, u.ResumedFromStep = &step, &step
			u.ExpectStatus = []string{protocol.RunMoving}
		}
		v, err := c.propose(ctx, cmdUpdateRun, u)
		if err != nil {
			return nil, err
		}
		return v.(*RunRecord), nil
	}
	return nil, retryAfter(fmt.Errorf("no node could open run %s: %v: %w", spec.RunID, lastErr, ErrNoCapacity), c.cfg.RetryAfter)
}

func (c *Coordinator) validateCreateRun(req *protocol.CreateRunRequest) (protocol.SessionSpec, ModelSpec, error) {
	var spec protocol.SessionSpec
	if req.BaseModel == "" {
		return spec, ModelSpec{}, fmt.Errorf("field base_model: required: %w", ErrInvalidRequest)
	}
	model, err := c.models.get(req.BaseModel)
	if err != nil {
		return spec, model, err
	}
	spec.BaseModel = model.Name
	spec.LoRARank = 32
	if req.LoRARank != nil {
		spec.LoRARank = *req.LoRARank
	}
	if spec.LoRARank < 1 || spec.LoRARank > maxLoRARank {
		return spec, model, fmt.Errorf("field lora_rank: %d out of range 1..%d: %w", spec.LoRARank, maxLoRARank, ErrInvalidRequest)
	}
	spec.LoRAAlpha = 32
	if req.LoRAAlpha != nil {
		spec.LoRAAlpha = *req.LoRAAlpha
	}
	if !(spec.LoRAAlpha > 0 && spec.LoRAAlpha <= maxLoRAAlpha) {
		return spec, model, fmt.Errorf("field lora_alpha: %v out of range (0, %d]: %w", spec.LoRAAlpha, maxLoRAAlpha, ErrInvalidRequest)
	}
	spec.TargetModules = allModules
	if len(req.TargetModules) > 0 {
		valid := map[string]bool{"all-linear": true}
		for _, m := range allModules {
			valid[m] = true
		}
		for _, m := range req.TargetModules {
			if !valid[m] {
				return spec, model, fmt.Errorf("field target_modules: %q is not one of %v or all-linear: %w", m, allModules, ErrInvalidRequest)
			}
		}
		spec.TargetModules = req.TargetModules
	}
	spec.CheckpointEvery = 10
	if req.CheckpointEvery != nil {
		spec.CheckpointEvery = *req.CheckpointEvery
	}
	if spec.CheckpointEvery < 0 || spec.CheckpointEvery > maxCheckpointEvery {
		return spec, model, fmt.Errorf("field checkpoint_every: %d out of range 0..%d (0 = never): %w", spec.CheckpointEvery, maxCheckpointEvery, ErrInvalidRequest)
	}
	if req.Seed != nil {
		spec.Seed = *req.Seed
	} else {
		var b [8]byte
		_, _ = rand.Read(b[:])
		spec.Seed = int64(binary.BigEndian.Uint64(b[:]) >> 1)
	}
	if len(req.Name) > maxNameLen {
		return spec, model, fmt.Errorf("field name: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	if s := req.LRSchedule; s != nil {
		switch {
		case s.Kind != "constant" && s.Kind != "linear" && s.Kind != "cosine":
			return spec, model, fmt.Errorf("field lr_schedule.kind: %q is not constant, linear or cosine: %w", s.Kind, ErrInvalidRequest)
		case !(s.PeakLR > 0 && s.PeakLR <= 10):
			return spec, model, fmt.Errorf("field lr_schedule.peak_lr: %v out of range (0, 10]: %w", s.PeakLR, ErrInvalidRequest)
		case s.WarmupSteps < 0 || s.TotalSteps < 0:
			return spec, model, fmt.Errorf("field lr_schedule: warmup_steps and total_steps must not be negative: %w", ErrInvalidRequest)
		case !(s.FinalFraction >= 0 && s.FinalFraction <= 1):
			return spec, model, fmt.Errorf("field lr_schedule.final_fraction: %v out of range [0, 1]: %w", s.FinalFraction, ErrInvalidRequest)
		}
		spec.LRSchedule, _ = json.Marshal(s)
	}
	return spec, model, nil
}

func (c *Coordinator) handleEndRun(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	if rec.Run.Status == protocol.RunEnded {
		return rec.Run, nil
	}
	if rec.Run.Node != "" && rec.Run.Status != protocol.RunFailed {
		resp, err := c.nodesBackend().Do(cl.r.Context(), rec.Run.Node, protocol.SessionRequest{RequestID: rec.Run.ID + "/close", RunID: rec.Run.ID, Call: protocol.CallClose})
		// A lost node has no session left to free; the run ends anyway.
		if err != nil && !errors.Is(err, ErrNodeLost) {
			return nil, fmt.Errorf("close run %s on %s: %w", rec.Run.ID, rec.Run.Node, err)
		}
		if err == nil && resp.Error != nil && resp.Error.Code != protocol.CodeNotFound {
			return nil, nodeError(resp.Error)
		}
	}
	v, err := c.propose(cl.r.Context(), cmdUpdateRun, RunUpdate{RunID: rec.Run.ID, Status: protocol.RunEnded, Time: now()})
	if err != nil {
		return nil, err
	}
	return v.(*RunRecord).Run, nil
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
	if req.Checkpoint == "" {
		return nil, fmt.Errorf("field checkpoint: required (an id, URI or CID): %w", ErrInvalidRequest)
	}
	var cp protocol.Checkpoint
	var src *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { cp, src, ok = s.OwnedCheckpoint(cl.account, req.Checkpoint) })
	if !ok {
		return nil, fmt.Errorf("field checkpoint: %q is not a checkpoint of your runs (GET /v1/runs/{id} lists them by id): %w", req.Checkpoint, ErrNotFound)
	}
	if src.Run.BaseModel != rec.Run.BaseModel || src.Run.LoRARank != rec.Run.LoRARank || !slices.Equal(src.Run.TargetModules, rec.Run.TargetModules) {
		return nil, fmt.Errorf("field checkpoint: %s holds a %s adapter of rank %d on %v, run %s is %s rank %d on %v; create a run with the checkpoint's settings to load it: %w",
			cp.ID, src.Run.BaseModel, src.Run.LoRARank, src.Run.TargetModules, rec.Run.ID, rec.Run.BaseModel, rec.Run.LoRARank, rec.Run.TargetModules, ErrInvalidRequest)
	}
	// The node gets the recorded reference, never the caller's string.
	req.Checkpoint = cp.URI
	if req.Checkpoint == "" {
		req.Checkpoint = cp.ID
	}
	body, _ := json.Marshal(req)
	resp, err := c.doRun(cl.r.Context(), cl, rec, protocol.CallLoadState, body)
	if err != nil {
		return nil, err
	}
	var out struct {
		Step *int `json:"step"`
	}
	_ = json.Unmarshal(resp.Body, &out)
	u := RunUpdate{RunID: rec.Run.ID, Step: out.Step, Time: now()}
	v, err := c.propose(cl.r.Context(), cmdUpdateRun, u)
	if err != nil {
		return nil, err
	}
	return v.(*RunRecord).Run, nil
}

// perThousand is ceil(n × price / 1000) without overflow, saturating.
func perThousand(n, price int64) int64 {
	if n <= 0 || price <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(n), uint64(price))
	if hi >= 1000 {
		return math.MaxInt64
	}
	q, r := bits.Div64(hi, lo, 1000)
	if r > 0 {
		q++
	}
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}

func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// bytesPerGB is the storage price's unit.
const bytesPerGB = 1_000_000_000

// priceUsage is a call's exact cost. Checkpoint storage is charged for its
// first hour when written.
func priceUsage(p protocol.Prices, u protocol.Usage) protocol.Cost {
	credits := satAdd(satAdd(perThousand(u.TrainTokens, p.TrainPer1K), perThousand(u.PrefillTokens, p.PrefillPer1K)), perThousand(u.SampledTokens, p.SamplePer1K))
	if u.StoredBytes > 0 && p.StoragePerGBHour > 0 {
		credits = satAdd(credits, perThousand(u.StoredBytes, p.StoragePerGBHour)/(bytesPerGB/1000)+1)
	}
	return protocol.Cost{Credits: credits, TrainTokens: u.TrainTokens, PrefillTokens: u.PrefillTokens, SampledTokens: u.SampledTokens}
}

// markLost asks the failover loop to move a run off node now. node is the
// node the failed call went to: by the time the call fails the run may have
// moved already, and the loop then ignores the mark.
func (c *Coordinator) markLost(runID, node string) {
	c.movingMu.Lock()
	c.missing[runID] = lostMark{node: node}
	c.movingMu.Unlock()
}
