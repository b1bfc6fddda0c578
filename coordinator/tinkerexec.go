package coordinator

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// tinkerWorkers bounds the queued calls the leader runs at once (each
// model's run one at a time; samples and creates beside them).
const tinkerWorkers = 32

// tinkerRunner is the leader's runner of queued Tinker calls, for one term.
type tinkerRunner struct {
	c       *Coordinator
	mu      sync.Mutex
	running map[string]bool
	// later holds calls that met a passing condition (a run starting or
	// moving, a full network) until they may try again.
	later map[string]time.Time
	// samplerMu serializes opening a sampling session's run.
	samplerMu map[string]*sync.Mutex
	// ran is each model's highest seq_id this runner ran, ahead of the
	// committed Done: the next call starts while the answer commits (a
	// next leader that never saw it runs the call again, which its
	// idempotency records answer).
	ran map[string]int
	sem chan struct{}
	wg  sync.WaitGroup
}

// pausedState is why a queued call waits: Tinker's queue_state and its
// reason, as retrieve_future's try_again answers them.
type pausedState struct{ state, reason string }

// tinkerLoop runs queued Tinker calls while this member leads: each
// model's calls in seq_id order, one at a time, the rest as they come. A
// new leader starts from the replicated queue; a call the old leader was
// running runs again under the same idempotency keys, so what it already
// did (and was charged for) is answered from its records, not redone.
func (c *Coordinator) tinkerLoop(ctx context.Context) {
	r := &tinkerRunner{c: c, running: map[string]bool{}, later: map[string]time.Time{}, samplerMu: map[string]*sync.Mutex{},
		ran: map[string]int{}, sem: make(chan struct{}, tinkerWorkers)}
	defer r.wg.Wait()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	expire := time.NewTicker(10 * time.Second)
	defer expire.Stop()
	for {
		r.dispatch(ctx)
		select {
		case <-ctx.Done():
			return
		case <-c.tinkerKick:
		case <-t.C:
		case <-expire.C:
			if gone := c.tinkerExpired(); len(gone) > 0 {
				if _, err := c.propose(ctx, cmdTinker, tinkerCmd{DeleteCheckpoints: gone}); err != nil && ctx.Err() == nil {
					c.log.Warn("forget expired tinker checkpoints", "category", "infrastructure", "err", err)
				}
			}
		}
	}
}

// dispatch starts every call that may run now.
func (r *tinkerRunner) dispatch(ctx context.Context) {
	var pending []TinkerFuture
	done := map[string]int{}
	r.c.fsm.read(func(s *State) {
		pending = s.pendingTinker()
		for _, f := range pending {
			if m, ok := s.TinkerModel(f.Model); ok {
				done[f.Model] = m.Done
			}
		}
	})
	heads := map[string]TinkerFuture{}
	for _, f := range pending {
		if f.Model != "" && f.Seq > 0 {
			if h, ok := heads[f.Model]; !ok || f.Seq < h.Seq {
				heads[f.Model] = f
			}
			continue
		}
		r.start(ctx, f)
	}
	r.mu.Lock()
	for model, d := range done {
		if r.ran[model] <= d {
			delete(r.ran, model)
		}
	}
	r.mu.Unlock()
	for model, f := range heads {
		// Calls that arrived early wait for the ones before them.
		r.mu.Lock()
		last := max(done[model], r.ran[model])
		r.mu.Unlock()
		if f.Seq == last+1 {
			r.start(ctx, f)
		}
	}
}

func (r *tinkerRunner) start(ctx context.Context, f TinkerFuture) {
	r.mu.Lock()
	if r.running[f.ID] || time.Now().Before(r.later[f.ID]) {
		r.mu.Unlock()
		return
	}
	select {
	case r.sem <- struct{}{}:
	default:
		r.mu.Unlock()
		return
	}
	r.running[f.ID] = true
	delete(r.later, f.ID)
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer func() {
			<-r.sem
			r.mu.Lock()
			delete(r.running, f.ID)
			r.mu.Unlock()
			r.c.tinkerWake()
		}()
		r.run(ctx, f)
	}()
}

// run runs one call and records its answer, or leaves it queued for a
// later try when what stopped it passes (503, 429) or leadership ended.
func (r *tinkerRunner) run(ctx context.Context, f TinkerFuture) {
	cmd, err := r.exec(ctx, f)
	if err != nil {
		if ctx.Err() != nil {
			return // the next leader runs it
		}
		status, _ := httpStatus(err)
		if status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests {
			r.mu.Lock()
			r.later[f.ID] = time.Now().Add(r.c.cfg.RetryAfter / 2)
			r.mu.Unlock()
			// retrieve_future's try_again says why the call waits.
			state := "paused_capacity"
			if status == http.StatusTooManyRequests {
				state = "paused_rate_limit"
			}
			r.c.tinkerPaused.Store(f.ID, pausedState{state, protocol.UserMessage(err)})
			return
		}
		cat, msg := "user", protocol.UserMessage(err)
		if status >= 500 {
			cat = "server"
			r.c.log.Warn("tinker call failed", "category", "processing", "future", f.ID, "kind", f.Kind, "err", err)
			msg = fmt.Sprintf("internal error running %s (future %s)", f.Kind, f.ID)
		}
		cmd = tinkerCmd{Finish: &tinkerFinish{ID: f.ID, Status: futureFailed, Error: msg, Category: cat}}
	}
	if f.Model != "" && f.Seq > 0 {
		r.mu.Lock()
		r.ran[f.Model] = max(r.ran[f.Model], f.Seq)
		r.mu.Unlock()
		r.c.tinkerWake()
	}
	r.c.tinkerPaused.Delete(f.ID)
	cmd.MaxBytes = r.c.tinkerBytes()
	if _, err := r.c.propose(ctx, cmdTinker, cmd); err != nil && ctx.Err() == nil {
		r.c.log.Warn("record tinker answer", "category", "infrastructure", "future", f.ID, "err", err)
	}
}

func done(id string, result any) (tinkerCmd, error) {
	b, err := json.Marshal(result)
	if err != nil {
		return tinkerCmd{}, err
	}
	return tinkerCmd{Finish: &tinkerFinish{ID: id, Status: futureDone, Result: b}}, nil
}

// exec runs one call through the /v1 handlers and builds its answer.
func (r *tinkerRunner) exec(ctx context.Context, f TinkerFuture) (tinkerCmd, error) {
	c := r.c
	var m TinkerModel
	if f.Model != "" {
		var ok bool
		c.fsm.read(func(s *State) { m, ok = s.TinkerModel(f.Model) })
		if !ok {
			return tinkerCmd{}, protocol.UserErrorf(ErrNotFound, "model_id %q is gone", f.Model)
		}
	}
	switch f.Kind {
	case kindCreateModel:
		var req createModelReq
		if err := json.Unmarshal(f.Request, &req); err != nil {
			return tinkerCmd{}, err
		}
		run, err := c.tinkerCreateRun(ctx, f.Account, f.ID, req)
		if err != nil {
			return tinkerCmd{}, err
		}
		cmd, err := done(f.ID, map[string]string{"model_id": req.ModelID, "type": "create_model"})
		cmd.Models = []TinkerModel{{ID: req.ModelID, Account: f.Account, RunID: run.ID, BaseModel: run.BaseModel, Rank: run.LoRARank, Time: now()}}
		return cmd, err
	case kindForward, kindForwardBackward:
		callName, route := protocol.CallForwardBackward, "forward_backward"
		if f.Kind == kindForward {
			callName, route = protocol.CallForward, "forward"
		}
		body, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID, http.MethodPost, "/v1/runs/"+m.RunID+"/"+route, m.RunID, f.Request, c.billed(callName))
		if err != nil {
			return tinkerCmd{}, err
		}
		return tinkerCmd{Finish: &tinkerFinish{ID: f.ID, Status: futureDone, Result: body}}, nil
	case kindOptimStep:
		body, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID, http.MethodPost, "/v1/runs/"+m.RunID+"/optim_step", m.RunID, f.Request, c.billed(protocol.CallOptimStep))
		if err != nil {
			return tinkerCmd{}, err
		}
		var o protocol.OptimStepResponse
		if err := json.Unmarshal(body, &o); err != nil {
			return tinkerCmd{}, fmt.Errorf("optim_step answer: %w", err)
		}
		return done(f.ID, map[string]any{"metrics": map[string]float64{
			"grad_norm:mean": o.GradNorm, "learning_rate:mean": o.LearningRate, "step:max": float64(o.Step)}})
	case kindSaveWeights, kindSaveForSampler, kindSaveExternal:
		return r.save(ctx, f, m)
	case kindLoadWeights:
		return r.load(ctx, f, m)
	case kindUnloadModel:
		if _, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID, http.MethodDelete, "/v1/runs/"+m.RunID, m.RunID, json.RawMessage(`{}`), c.handleEndRun); err != nil {
			return tinkerCmd{}, err
		}
		return done(f.ID, map[string]string{"model_id": m.ID, "type": "unload_model"})
	case kindSample:
		return r.sample(ctx, f)
	}
	return tinkerCmd{}, fmt.Errorf("future %s: kind %q: %w", f.ID, f.Kind, ErrInvalidRequest)
}

// tinkerCreateRun opens the run behind a Tinker model (idempotently: a
// retry, on any leader, answers the run the first try made).
func (c *Coordinator) tinkerCreateRun(ctx context.Context, account, key string, req createModelReq) (protocol.Run, error) {
	rank := req.Rank
	body, err := c.internalCall(ctx, account, "tinker:"+key+":run", http.MethodPost, "/v1/runs", "",
		protocol.CreateRunRequest{BaseModel: req.BaseModel, LoRARank: &rank, Seed: req.Seed, Name: req.ModelID}, c.handleCreateRun)
	if err != nil {
		return protocol.Run{}, err
	}
	var run protocol.Run
	if err := json.Unmarshal(body, &run); err != nil {
		return run, fmt.Errorf("create_run answer: %w", err)
	}
	return run, nil
}

func (r *tinkerRunner) save(ctx context.Context, f TinkerFuture, m TinkerModel) (tinkerCmd, error) {
	c := r.c
	var req saveReq
	if err := json.Unmarshal(f.Request, &req); err != nil {
		return tinkerCmd{}, err
	}
	mode, typ, seg := "full", "training", "weights"
	switch f.Kind {
	case kindSaveForSampler:
		mode, typ, seg = "adapter", "sampler", "sampler_weights"
	case kindSaveExternal:
		// The weights a user takes away: the PEFT adapter files.
		mode, typ, seg = "adapter", "external", "external_weights"
	}
	body, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID, http.MethodPost, "/v1/runs/"+m.RunID+"/save_state", m.RunID,
		protocol.SaveStateRequest{Mode: mode, Name: req.Name}, c.billed(protocol.CallSaveState))
	if err != nil {
		return tinkerCmd{}, err
	}
	var sr protocol.SaveStateResponse
	if err := json.Unmarshal(body, &sr); err != nil {
		return tinkerCmd{}, fmt.Errorf("save_state answer: %w", err)
	}
	cp := sr.Checkpoint
	name := req.Name
	if name == "" {
		name = cp.ID
	}
	var size int64
	for _, file := range cp.Files {
		size += file.Size
	}
	tc := TinkerCheckpoint{Path: fmt.Sprintf("tinker://%s/%s/%s", m.RunID, seg, name), Account: f.Account, RunID: m.RunID,
		Name: name, Type: typ, Checkpoint: cp.ID, Size: size, Time: now(), Expires: req.Expires}
	result := map[string]any{"path": tc.Path, "type": f.Kind}
	cmd := tinkerCmd{Checkpoints: []TinkerCheckpoint{tc}}
	if req.Session != "" {
		result = map[string]any{"path": nil, "sampling_session_id": req.Session, "type": f.Kind}
		cmd.Samplers = []TinkerSampler{{ID: req.Session, Account: f.Account, BaseModel: m.BaseModel, RunID: m.RunID,
			Step: cp.Step, Checkpoint: cp.ID, Time: now()}}
	}
	d, err := done(f.ID, result)
	cmd.Finish = d.Finish
	return cmd, err
}

func (r *tinkerRunner) load(ctx context.Context, f TinkerFuture, m TinkerModel) (tinkerCmd, error) {
	c := r.c
	var req loadReq
	if err := json.Unmarshal(f.Request, &req); err != nil {
		return tinkerCmd{}, err
	}
	cp, _, err := c.tinkerCheckpointOf(f.Account, req.Path, "path")
	if err != nil {
		return tinkerCmd{}, err
	}
	var cmd tinkerCmd
	runID := m.RunID
	if req.New != nil {
		run, err := c.tinkerCreateRun(ctx, f.Account, f.ID, *req.New)
		if err != nil {
			return tinkerCmd{}, err
		}
		runID = run.ID
		cmd.Models = []TinkerModel{{ID: req.New.ModelID, Account: f.Account, RunID: run.ID, BaseModel: run.BaseModel, Rank: run.LoRARank, Time: now()}}
	}
	if _, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID+":load", http.MethodPost, "/v1/runs/"+runID+"/load_state", runID,
		protocol.LoadStateRequest{Checkpoint: cp.Checkpoint, WeightsOnly: !req.Optimizer}, c.handleLoadState); err != nil {
		return tinkerCmd{}, err
	}
	d, err := done(f.ID, map[string]any{"path": req.Path, "type": "load_weights"})
	cmd.Finish = d.Finish
	return cmd, err
}

// sampleResult is a sample future's answer: the samples and, when asked,
// the prompt's logprobs (null at position 0).
type sampleResult struct {
	Samples        []protocol.Sample `json:"samples"`
	PromptLogprobs []*float64        `json:"prompt_logprobs,omitempty"`
	// TopK, TopIDs and TopLogprobs are each prompt position's TopK most
	// likely tokens (nil at position 0, which has no context).
	TopK        int         `json:"top_k,omitempty"`
	TopIDs      [][]int     `json:"top_ids,omitempty"`
	TopLogprobs [][]float64 `json:"top_logprobs,omitempty"`
}

func (r *tinkerRunner) sample(ctx context.Context, f TinkerFuture) (tinkerCmd, error) {
	c := r.c
	var req sampleReq
	if err := json.Unmarshal(f.Request, &req); err != nil {
		return tinkerCmd{}, err
	}
	runID, err := r.samplerRun(ctx, f.Account, req.Sampler)
	if err != nil {
		return tinkerCmd{}, err
	}
	path := "/v1/runs/" + runID
	out := sampleResult{TopK: req.TopK}
	if req.PromptLogprobs || req.TopK > 0 {
		out.PromptLogprobs = []*float64{nil}
		if req.TopK > 0 {
			out.TopIDs, out.TopLogprobs = [][]int{nil}, [][]float64{nil}
		}
		if n := len(req.Prompt); n > 1 {
			// Each prompt token's logprob given the ones before it: a
			// forward of the prompt against itself shifted by one, the
			// same numbers forward answers.
			ones := make([]float64, n-1)
			for i := range ones {
				ones[i] = 1
			}
			fw := protocol.ForwardBackwardRequest{Data: []protocol.Datum{{ModelInput: protocol.ModelInput{Tokens: req.Prompt[:n-1]},
				LossFnInputs: protocol.LossFnInputs{TargetTokens: req.Prompt[1:], Weights: ones}}}, TopKLogprobs: req.TopK}
			body, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID+":prompt", http.MethodPost, path+"/forward", runID, fw, c.billed(protocol.CallForward))
			if err != nil {
				return tinkerCmd{}, err
			}
			var fr protocol.ForwardBackwardResponse
			if err := json.Unmarshal(body, &fr); err != nil || len(fr.Logprobs) != 1 {
				return tinkerCmd{}, fmt.Errorf("forward answer for prompt logprobs: %v: %w", err, ErrBadNodeAnswer)
			}
			for _, v := range fr.Logprobs[0] {
				out.PromptLogprobs = append(out.PromptLogprobs, ptr(v))
			}
			if req.TopK > 0 {
				if len(fr.TopLogprobs) != 1 || len(fr.TopLogprobs[0].IDs) != n-1 {
					return tinkerCmd{}, fmt.Errorf("forward answer for top-%d prompt logprobs: %w", req.TopK, ErrBadNodeAnswer)
				}
				out.TopIDs = append(out.TopIDs, fr.TopLogprobs[0].IDs...)
				out.TopLogprobs = append(out.TopLogprobs, fr.TopLogprobs[0].Logprobs...)
			}
		}
	}
	if n := req.LastN; n > 0 {
		// Only the last n positions are scored, as asked (the SDK checks).
		for i := 0; i < len(out.PromptLogprobs)-n; i++ {
			out.PromptLogprobs[i] = nil
			if req.TopK > 0 {
				out.TopIDs[i], out.TopLogprobs[i] = nil, nil
			}
		}
	}
	if !req.PromptLogprobs {
		out.PromptLogprobs = nil // asked for the top-k alone
	}
	n := req.NumSamples
	sreq := protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: req.Prompt}}, NumSamples: &n, SamplingParams: req.Params}
	body, err := c.internalCall(ctx, f.Account, "tinker:"+f.ID+":sample", http.MethodPost, path+"/sample", runID, sreq, c.billed(protocol.CallSample))
	if err != nil {
		return tinkerCmd{}, err
	}
	var sr protocol.SampleResponse
	if err := json.Unmarshal(body, &sr); err != nil || len(sr.Samples) != 1 {
		return tinkerCmd{}, fmt.Errorf("sample answer: %v: %w", err, ErrBadNodeAnswer)
	}
	out.Samples = sr.Samples[0]
	return done(f.ID, out)
}

// samplerRun is the run a sampling session samples on: its training run
// while that still holds the saved step's weights (no optimizer step
// since), else a run of its own with the saved adapter loaded (or none:
// the base model, which an untrained LoRA leaves unchanged).
func (r *tinkerRunner) samplerRun(ctx context.Context, account, id string) (string, error) {
	c := r.c
	r.mu.Lock()
	mu := r.samplerMu[id]
	if mu == nil {
		mu = &sync.Mutex{}
		r.samplerMu[id] = mu
	}
	r.mu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	var sm TinkerSampler
	var ok bool
	var runID string
	var src *RunRecord
	c.fsm.read(func(s *State) {
		if sm, ok = s.TinkerSampler(id); !ok || sm.Account != account {
			ok = false
			return
		}
		if run, found := s.Run(sm.RunID); found && run.Run.Step == sm.Step && isActive(run.Run.Status) {
			runID = sm.RunID
			return
		}
		if run, found := s.Run(sm.SampleRun); found && isActive(run.Run.Status) {
			runID = sm.SampleRun
			return
		}
		if sm.Checkpoint != "" {
			_, src, _ = s.OwnedCheckpoint(account, sm.Checkpoint)
		}
	})
	if !ok {
		return "", protocol.UserErrorf(ErrNotFound, "sampling session %q is gone", id)
	}
	if runID != "" {
		return runID, nil
	}
	req := createModelReq{ModelID: id, BaseModel: sm.BaseModel, Rank: 1}
	if sm.Checkpoint != "" {
		if src == nil {
			return "", protocol.UserErrorf(ErrNotFound, "the checkpoint of sampling session %q is gone", id)
		}
		seed := src.Seed
		req.Rank, req.Seed = src.Run.LoRARank, &seed
	}
	run, err := c.tinkerCreateRun(ctx, account, "sampler:"+id, req)
	if err != nil {
		return "", err
	}
	if sm.Checkpoint != "" {
		if _, err := c.internalCall(ctx, account, "tinker:sampler:"+id+":load", http.MethodPost, "/v1/runs/"+run.ID+"/load_state", run.ID,
			protocol.LoadStateRequest{Checkpoint: sm.Checkpoint, WeightsOnly: true}, c.handleLoadState); err != nil {
			return "", err
		}
	}
	sm.SampleRun = run.ID
	if _, err := c.propose(ctx, cmdTinker, tinkerCmd{Samplers: []TinkerSampler{sm}}); err != nil {
		return "", err
	}
	return run.ID, nil
}
