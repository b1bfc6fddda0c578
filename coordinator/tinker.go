package coordinator

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/tinker"
)

// The Tinker door: Tinker's wire API under /api/v1, beside Signal's /v1,
// so the tinker SDK and tinker-cookbook recipes run unchanged against a
// coordinator (TINKER_BASE_URL = a coordinator, TINKER_API_KEY = "tml-" +
// a Signal key). Handlers here parse and queue; the calls run through the
// same handlers, holds, charges and idempotency records as /v1 calls
// (tinkerexec.go), and the futures are raft records (tinkerbook.go).

// Defaults of the door's bounds (Config fields of the same names override).
const (
	defaultTinkerPoll       = 25 * time.Second
	defaultTinkerQueueBytes = 64 << 20
	defaultTinkerBytes      = 256 << 20
)

// Future kinds.
const (
	kindCreateModel     = "create_model"
	kindForward         = "forward"
	kindForwardBackward = "forward_backward"
	kindOptimStep       = "optim_step"
	kindSaveWeights     = "save_weights"
	kindSaveForSampler  = "save_weights_for_sampler"
	kindSaveExternal    = "save_weights_external"
	kindLoadWeights     = "load_weights"
	kindUnloadModel     = "unload_model"
	kindSample          = "sample"
)

// tinkerSignal wakes long polls and the queue runner when the book changes.
type tinkerSignal struct {
	mu sync.Mutex
	ch chan struct{}
}

func newTinkerSignal() *tinkerSignal { return &tinkerSignal{ch: make(chan struct{})} }

// wait returns a channel closed at the next change.
func (t *tinkerSignal) wait() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ch
}

func (t *tinkerSignal) notify() {
	t.mu.Lock()
	close(t.ch)
	t.ch = make(chan struct{})
	t.mu.Unlock()
}

func (c *Coordinator) tinkerRoutes(mux *http.ServeMux) {
	user := routeOpts{auth: authUser, tinker: true}
	big := routeOpts{auth: authUser, tinker: true, maxBody: c.cfg.MaxBodyBytes}
	local := routeOpts{local: true, tinker: true}
	r := func(pattern, name string, o routeOpts, h handlerFunc) { c.route(mux, pattern, "tinker_"+name, o, h) }
	r("GET /api/v1/healthz", "healthz", local, func(*call) (any, error) { return map[string]string{"status": "ok"}, nil })
	r("POST /api/v1/client/config", "client_config", user, c.tinkerClientConfig)
	r("POST /api/v1/client/dynamic_config", "client_dynamic_config", user, func(*call) (any, error) {
		return map[string]any{"refresh_interval_sec": 300, "sample_cancel_enabled": false}, nil
	})
	r("POST /api/v1/telemetry", "telemetry", routeOpts{auth: authUser, tinker: true, local: true}, func(*call) (any, error) {
		return map[string]string{"status": "accepted"}, nil // accepted and dropped
	})
	r("POST /api/v1/create_session", "create_session", user, func(*call) (any, error) {
		return map[string]any{"type": "create_session", "session_id": "sess_" + newID(8),
			"info_message": "Signal trains LoRA on attention and MLP projections; train_unembed is accepted and not trained"}, nil
	})
	r("POST /api/v1/session_heartbeat", "session_heartbeat", user, func(*call) (any, error) {
		return map[string]string{"type": "session_heartbeat"}, nil
	})
	r("POST /api/v1/sessions/{id}/finish", "session_finish", user, c.tinkerFinishSession)
	r("GET /api/v1/get_server_capabilities", "capabilities", user, c.tinkerCapabilities)
	r("POST /api/v1/get_info", "get_info", user, c.tinkerGetInfo)
	r("POST /api/v1/weights_info", "weights_info", user, c.tinkerWeightsInfo)
	r("POST /api/v1/create_model", "create_model", user, c.tinkerCreateModel)
	r("POST /api/v1/forward_backward", "forward_backward", big, c.tinkerForwardBackward(false))
	r("POST /api/v1/forward", "forward", big, c.tinkerForwardBackward(true))
	r("POST /api/v1/optim_step", "optim_step", user, c.tinkerOptimStep)
	r("POST /api/v1/save_weights", "save_weights", user, c.tinkerSaveWeights(kindSaveWeights))
	r("POST /api/v1/save_weights_for_sampler", "save_weights_for_sampler", user, c.tinkerSaveWeights(kindSaveForSampler))
	r("POST /api/v1/save_weights_external", "save_weights_external", user, c.tinkerSaveWeights(kindSaveExternal))
	r("POST /api/v1/load_weights", "load_weights", user, c.tinkerLoadWeights)
	r("POST /api/v1/unload_model", "unload_model", user, c.tinkerUnloadModel)
	r("POST /api/v1/create_sampling_session", "create_sampling_session", user, c.tinkerCreateSampler)
	r("GET /api/v1/samplers/{id}", "get_sampler", user, c.tinkerGetSampler)
	r("POST /api/v1/asample", "asample", big, c.tinkerSample)
	r("POST /api/v1/retrieve_future", "retrieve_future", user, c.tinkerRetrieve)
	r("GET /api/v1/training_runs", "training_runs", user, c.tinkerTrainingRuns)
	r("GET /api/v1/training_runs/{id}", "training_run", user, c.tinkerTrainingRun)
	r("GET /api/v1/training_runs/{id}/checkpoints", "checkpoints", user, c.tinkerCheckpoints)
	r("DELETE /api/v1/training_runs/{id}/checkpoints/{kind}/{name}", "delete_checkpoint", user, c.tinkerDeleteCheckpoint)
	r("GET /api/v1/checkpoints", "user_checkpoints", user, c.tinkerCheckpoints)
	r("GET /api/v1/training_runs/{id}/checkpoints/{kind}/{name}/external_weights_urls", "file_urls", user, c.tinkerFileURLs)
	r("PUT /api/v1/training_runs/{id}/checkpoints/{kind}/{name}/ttl", "checkpoint_ttl", user, c.tinkerSetTTL)
	notPublic := func(*call) (any, error) {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "publishing checkpoints is not served by Signal: share one by pushing it to the Hugging Face Hub (POST /v1/checkpoints/{id}/push, or signal checkpoints push)")
	}
	r("POST /api/v1/training_runs/{id}/checkpoints/{kind}/{name}/publish", "publish", user, notPublic)
	r("DELETE /api/v1/training_runs/{id}/checkpoints/{kind}/{name}/publish", "unpublish", user, notPublic)

	mux.HandleFunc("/api/v1/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, protocol.CodeNotFound, fmt.Sprintf("Signal's Tinker API has no route %s %s", r.Method, r.URL.Path), "")
	})
}

// tinkerClientConfig switches the SDK to what Signal serves: API keys (no
// JWT exchange), the httpx transport, zstd protobuf forward_backward bodies,
// and no long pause on 402 (an empty balance is the user's to fix).
func (c *Coordinator) tinkerClientConfig(*call) (any, error) {
	out := map[string]any{
		"pjwt_auth_enabled":                        false,
		"credential_default_source":                "api_key",
		"use_pyqwest_transport":                    false,
		"parallel_fwdbwd_chunks":                   true,
		"proto_compress_fwdbwd":                    true,
		"billing_exception_max_pause_duration_sec": 0,
		"sample_use_retrieve_futures":              false,
		"sample_join_sampling_session":             false,
		"custom_loss_server_side":                  false,
	}
	if c.cfg.TinkerChunkLen > 0 {
		out["fwdbwd_max_chunk_len"] = c.cfg.TinkerChunkLen
	}
	return out, nil
}

// tinkerFinishSession ends the runs a closing ServiceClient's session
// holds open: its models' and its sampling sessions' (their checkpoints
// stay, as every ended run's do). Tinker frees a session's resources when
// it closes; without this, sampler runs would hold node sessions until
// the idle timeout.
func (c *Coordinator) tinkerFinishSession(cl *call) (any, error) {
	session := cl.r.PathValue("id")
	var recs []*RunRecord
	c.fsm.read(func(s *State) {
		for _, m := range s.TinkerModelsOf(cl.account) {
			if strings.HasPrefix(m.ID, session+":train:") {
				if r, ok := s.Run(m.RunID); ok && isActive(r.Run.Status) {
					recs = append(recs, r)
				}
			}
		}
		for id, sm := range s.tinker.samplers {
			if sm.Account == cl.account && strings.HasPrefix(id, session+":sample:") {
				if r, ok := s.Run(sm.SampleRun); ok && isActive(r.Run.Status) {
					recs = append(recs, r)
				}
			}
		}
	})
	for _, r := range recs {
		if _, err := c.endRun(cl.r.Context(), r); err != nil {
			return nil, err
		}
	}
	return map[string]any{}, nil
}

func (c *Coordinator) tinkerCapabilities(*call) (any, error) {
	var models []map[string]any
	for _, n := range c.models.names {
		m := c.models.byName[n]
		for _, name := range append([]string{m.Name, m.HFRepo}, m.Aliases...) {
			if name != "" {
				models = append(models, map[string]any{"model_name": name, "max_context_length": m.ContextLength, "trainable": true, "sampleable": true})
			}
		}
	}
	return map[string]any{"supported_models": models}, nil
}

// tinkerModel returns the caller's model named in a request.
func (c *Coordinator) tinkerModel(account, id string) (TinkerModel, error) {
	var m TinkerModel
	var ok bool
	c.fsm.read(func(s *State) { m, ok = s.TinkerModel(id) })
	if !ok || m.Account != account {
		return m, protocol.UserErrorf(ErrNotFound, "model_id %q is not one of your models: create it with create_model (or load_weights) first", id)
	}
	return m, nil
}

// tokenizerID is what get_info names as the model's tokenizer: its
// Hugging Face repository, else its local directory (a testnet's), else
// its name.
func tokenizerID(m ModelSpec) string {
	switch {
	case m.HFRepo != "":
		return m.HFRepo
	case m.Path != "":
		return m.Path
	}
	return m.Name
}

// bodyModel is the caller's model a {"model_id"} body names.
func (c *Coordinator) bodyModel(cl *call) (TinkerModel, error) {
	var req struct {
		ModelID string `json:"model_id"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return TinkerModel{}, err
	}
	return c.tinkerModel(cl.account, req.ModelID)
}

func (c *Coordinator) tinkerGetInfo(cl *call) (any, error) {
	m, err := c.bodyModel(cl)
	if err != nil {
		return nil, err
	}
	spec, err := c.models.get(m.BaseModel)
	if err != nil {
		return nil, err
	}
	return map[string]any{
		"type": "get_info", "model_id": m.ID, "model_name": m.BaseModel, "is_lora": true, "lora_rank": m.Rank,
		"model_data": map[string]any{"arch": "llama", "model_name": m.BaseModel, "tokenizer_id": tokenizerID(spec)},
	}, nil
}

func (c *Coordinator) tinkerWeightsInfo(cl *call) (any, error) {
	var req struct {
		TinkerPath string `json:"tinker_path"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	cp, rec, err := c.tinkerCheckpointOf(cl.account, req.TinkerPath, "tinker_path")
	if err != nil {
		return nil, err
	}
	return map[string]any{"base_model": rec.Run.BaseModel, "is_lora": true, "lora_rank": rec.Run.LoRARank,
		"train_attn": true, "train_mlp": true, "train_unembed": false, "optimizer_config": map[string]string{"type": "adamw"}, "path": cp.Path}, nil
}

// tinkerCheckpointOf resolves a tinker:// path of the caller's.
func (c *Coordinator) tinkerCheckpointOf(account, path, field string) (TinkerCheckpoint, *RunRecord, error) {
	var cp TinkerCheckpoint
	var rec *RunRecord
	var ok bool
	c.fsm.read(func(s *State) {
		if cp, ok = s.TinkerCheckpoint(path); ok && cp.Account == account {
			rec, ok = s.Run(cp.RunID)
		} else {
			ok = false
		}
	})
	if !ok {
		return cp, nil, protocol.UserErrorf(ErrNotFound, "%s %q is not one of your checkpoints: use a path save_weights or save_weights_for_sampler returned (tinker://RUN/weights/NAME)", field, path)
	}
	return cp, rec, nil
}

// ---- queued calls ----

// submit records a future and answers its id: Tinker's UntypedAPIFuture.
func (c *Coordinator) submit(cl *call, f TinkerFuture, extra map[string]any) (any, error) {
	f.Account, f.Time = cl.account, now()
	v, err := c.propose(cl.r.Context(), cmdTinker, tinkerCmd{Submit: &f, MaxPendingBytes: c.tinkerQueueBytes(), MaxBytes: c.tinkerBytes()})
	if err != nil {
		return nil, err
	}
	rec := v.(TinkerFuture)
	c.tinkerWake()
	out := map[string]any{"request_id": rec.ID}
	if rec.Model != "" {
		out["model_id"] = rec.Model
	}
	for k, x := range extra {
		out[k] = x
	}
	return out, nil
}

func (c *Coordinator) tinkerQueueBytes() int64 {
	if c.cfg.TinkerQueueBytes > 0 {
		return c.cfg.TinkerQueueBytes
	}
	return defaultTinkerQueueBytes
}

func (c *Coordinator) tinkerBytes() int64 {
	if c.cfg.TinkerBytes > 0 {
		return c.cfg.TinkerBytes
	}
	return defaultTinkerBytes
}

// orderedID is the future of a model's seq_id: the same call, however
// often the client sends it.
func orderedID(model string, seq int) string { return fmt.Sprintf("%s#%d", model, seq) }

func (c *Coordinator) ordered(cl *call, model string, seq *int, kind string, req any) (any, error) {
	if _, err := c.tinkerModel(cl.account, model); err != nil {
		return nil, err
	}
	if seq == nil || *seq < 1 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "seq_id is missing or below 1: number each model's calls 1, 2, 3, … (the tinker SDK does)")
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	return c.submit(cl, TinkerFuture{ID: orderedID(model, *seq), Model: model, Seq: *seq, Kind: kind, Request: body}, nil)
}

// createModelReq is a create_model (and load_weights' new model) to run.
type createModelReq struct {
	ModelID   string `json:"model_id"`
	BaseModel string `json:"base_model"`
	Rank      int    `json:"rank"`
	Seed      *int64 `json:"seed,omitempty"`
}

func (c *Coordinator) tinkerCreateModel(cl *call) (any, error) {
	var req struct {
		SessionID  string `json:"session_id"`
		ModelSeqID int    `json:"model_seq_id"`
		BaseModel  string `json:"base_model"`
		LoraConfig *struct {
			Rank int    `json:"rank"`
			Seed *int64 `json:"seed"`
		} `json:"lora_config"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	spec, err := c.models.get(req.BaseModel)
	if err != nil {
		return nil, err
	}
	cm := createModelReq{ModelID: modelID(req.SessionID, req.ModelSeqID), BaseModel: spec.Name, Rank: 32}
	if lc := req.LoraConfig; lc != nil {
		cm.Rank, cm.Seed = lc.Rank, lc.Seed
	}
	if err := checkSession(req.SessionID); err != nil {
		return nil, err
	}
	body, _ := json.Marshal(cm)
	return c.submit(cl, TinkerFuture{ID: "create:" + cm.ModelID, Kind: kindCreateModel, Request: body}, map[string]any{"model_id": cm.ModelID})
}

// modelID is the id the tinker SDK derives for a session's n-th training
// client (it computes it itself for load_weights).
func modelID(session string, seq int) string { return fmt.Sprintf("%s:train:%d", session, seq) }

func checkSession(id string) error {
	if id == "" || len(id) > 128 || strings.ContainsAny(id, "/#\x00") {
		return protocol.UserErrorf(ErrInvalidRequest, "session_id %q is not a session this door made: call create_session first", id)
	}
	return nil
}

func (c *Coordinator) tinkerForwardBackward(forwardRoute bool) handlerFunc {
	return func(cl *call) (any, error) {
		fb, err := tinker.DecodeForwardBackward(cl.body, cl.r.Header.Get("Content-Type"), cl.r.Header.Get("Content-Encoding"), forwardRoute)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
		}
		m, err := c.tinkerModel(cl.account, fb.ModelID)
		if err != nil {
			return nil, err
		}
		spec, err := c.models.get(m.BaseModel)
		if err != nil {
			return nil, err
		}
		// Refused now, not when it runs: the SDK's POST is where a bad
		// batch should surface.
		if _, err := validateForward(&fb.Call, spec, nil); err != nil {
			return nil, err
		}
		kind := kindForwardBackward
		if fb.ForwardOnly {
			kind = kindForward
		}
		seq := fb.SeqID
		return c.ordered(cl, fb.ModelID, &seq, kind, fb.Call)
	}
}

func (c *Coordinator) tinkerOptimStep(cl *call) (any, error) {
	var req struct {
		ModelID string `json:"model_id"`
		SeqID   *int   `json:"seq_id"`
		// The SDK sends adam_params (optim_params is the field's name in
		// its model, and an older wire's).
		AdamParams  *tinkerAdam `json:"adam_params"`
		OptimParams *tinkerAdam `json:"optim_params"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	// Tinker's AdamParams defaults, where Signal's differ.
	p := protocol.AdamParams{LearningRate: ptr(1e-4), Beta1: ptr(0.9), Beta2: ptr(0.95), Eps: ptr(1e-12), WeightDecay: ptr(0.0), GradClipNorm: ptr(0.0)}
	o := req.AdamParams
	if o == nil {
		o = req.OptimParams
	}
	if o != nil {
		for _, f := range []struct{ dst, src **float64 }{{&p.LearningRate, &o.LearningRate}, {&p.Beta1, &o.Beta1}, {&p.Beta2, &o.Beta2},
			{&p.Eps, &o.Eps}, {&p.WeightDecay, &o.WeightDecay}, {&p.GradClipNorm, &o.GradClipNorm}} {
			if *f.src != nil {
				*f.dst = *f.src
			}
		}
	}
	if err := validateAdam(&p); err != nil {
		return nil, err
	}
	return c.ordered(cl, req.ModelID, req.SeqID, kindOptimStep, protocol.OptimStepRequest{AdamParams: &p})
}

// tinkerAdam is Tinker's AdamParams.
type tinkerAdam struct {
	LearningRate *float64 `json:"learning_rate"`
	Beta1        *float64 `json:"beta1"`
	Beta2        *float64 `json:"beta2"`
	Eps          *float64 `json:"eps"`
	WeightDecay  *float64 `json:"weight_decay"`
	GradClipNorm *float64 `json:"grad_clip_norm"`
}

func ptr[T any](v T) *T { return &v }

// saveReq is a save_weights, save_weights_for_sampler or
// save_weights_external to run.
type saveReq struct {
	Name string `json:"name,omitempty"`
	// Expires is the checkpoint's end (its ttl_seconds from the request).
	Expires string `json:"expires,omitempty"`
	// Session asks for a sampling session on the saved weights (the SDK's
	// save_weights_and_get_sampling_client), with this id.
	Session string `json:"session,omitempty"`
}

func (c *Coordinator) tinkerSaveWeights(kind string) handlerFunc {
	return func(cl *call) (any, error) {
		var req struct {
			ModelID              string   `json:"model_id"`
			Path                 string   `json:"path"`
			SeqID                *int     `json:"seq_id"`
			SamplingSessionSeqID *int     `json:"sampling_session_seq_id"`
			TTLSeconds           *int64   `json:"ttl_seconds"`
			Recipients           []string `json:"age_encryption_recipients"`
		}
		if err := decodeTinker(cl.body, &req); err != nil {
			return nil, err
		}
		if len(req.Recipients) > 0 {
			return nil, protocol.UserErrorf(ErrInvalidRequest, "age_encryption_recipients: Signal does not encrypt exports yet; send none (the download URLs are signed and short-lived)")
		}
		sr := saveReq{Name: req.Path}
		if err := checkName(sr.Name); err != nil {
			return nil, err
		}
		var err error
		if sr.Expires, err = expiry(req.TTLSeconds); err != nil {
			return nil, err
		}
		if kind == kindSaveForSampler && req.Path == "" {
			session, _, _ := strings.Cut(req.ModelID, ":")
			seq := 0
			if req.SamplingSessionSeqID != nil {
				seq = *req.SamplingSessionSeqID
			}
			sr.Session = samplerID(session, seq)
		}
		return c.ordered(cl, req.ModelID, req.SeqID, kind, sr)
	}
}

// checkName bounds a checkpoint name: one path segment.
func checkName(name string) error {
	if len(name) > maxNameLen || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return protocol.UserErrorf(ErrInvalidRequest, "path %q is not a checkpoint name: give one path segment of at most %d characters", name, maxNameLen)
	}
	return nil
}

func samplerID(session string, seq int) string { return fmt.Sprintf("%s:sample:%d", session, seq) }

// loadReq is a load_weights to run: into Model, created first from New
// when the SDK makes a training client from a checkpoint.
type loadReq struct {
	Path      string          `json:"path"`
	Optimizer bool            `json:"optimizer"`
	New       *createModelReq `json:"new,omitempty"`
}

func (c *Coordinator) tinkerLoadWeights(cl *call) (any, error) {
	var req struct {
		ModelID    string `json:"model_id"`
		SeqID      *int   `json:"seq_id"`
		SessionID  string `json:"session_id"`
		ModelSeqID *int   `json:"model_seq_id"`
		Path       string `json:"path"`
		Optimizer  bool   `json:"optimizer"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	_, rec, err := c.tinkerCheckpointOf(cl.account, req.Path, "path")
	if err != nil {
		return nil, err
	}
	lr := loadReq{Path: req.Path, Optimizer: req.Optimizer}
	if req.ModelID != "" {
		return c.ordered(cl, req.ModelID, req.SeqID, kindLoadWeights, lr)
	}
	if err := checkSession(req.SessionID); err != nil {
		return nil, err
	}
	if req.ModelSeqID == nil {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "load_weights names neither model_id nor session_id and model_seq_id: name the model to load into")
	}
	seed := rec.Seed
	lr.New = &createModelReq{ModelID: modelID(req.SessionID, *req.ModelSeqID), BaseModel: rec.Run.BaseModel, Rank: rec.Run.LoRARank, Seed: &seed}
	body, _ := json.Marshal(lr)
	return c.submit(cl, TinkerFuture{ID: "create:" + lr.New.ModelID, Kind: kindLoadWeights, Request: body}, map[string]any{"model_id": lr.New.ModelID})
}

func (c *Coordinator) tinkerUnloadModel(cl *call) (any, error) {
	m, err := c.bodyModel(cl)
	if err != nil {
		return nil, err
	}
	return c.submit(cl, TinkerFuture{ID: "unload:" + m.ID, Kind: kindUnloadModel, Request: json.RawMessage(`{}`), Model: m.ID}, nil)
}

// ---- sampling ----

func (c *Coordinator) tinkerCreateSampler(cl *call) (any, error) {
	var req struct {
		SessionID            string `json:"session_id"`
		SamplingSessionSeqID int    `json:"sampling_session_seq_id"`
		BaseModel            string `json:"base_model"`
		ModelPath            string `json:"model_path"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	if err := checkSession(req.SessionID); err != nil {
		return nil, err
	}
	sm := TinkerSampler{ID: samplerID(req.SessionID, req.SamplingSessionSeqID), Account: cl.account, Time: now()}
	switch {
	case req.ModelPath != "":
		cp, rec, err := c.tinkerCheckpointOf(cl.account, req.ModelPath, "model_path")
		if err != nil {
			return nil, err
		}
		sm.BaseModel, sm.Checkpoint, sm.ModelPath = rec.Run.BaseModel, cp.Checkpoint, cp.Path
	case req.BaseModel != "":
		spec, err := c.models.get(req.BaseModel)
		if err != nil {
			return nil, err
		}
		sm.BaseModel = spec.Name
	default:
		return nil, protocol.UserErrorf(ErrInvalidRequest, "create_sampling_session names neither base_model nor model_path: give one")
	}
	if _, err := c.propose(cl.r.Context(), cmdTinker, tinkerCmd{Samplers: []TinkerSampler{sm}}); err != nil {
		return nil, err
	}
	return map[string]any{"type": "create_sampling_session", "sampling_session_id": sm.ID}, nil
}

func (c *Coordinator) tinkerSampler(account, id string) (TinkerSampler, error) {
	var sm TinkerSampler
	var ok bool
	c.fsm.read(func(s *State) { sm, ok = s.TinkerSampler(id) })
	if !ok || sm.Account != account {
		return sm, protocol.UserErrorf(ErrNotFound, "sampling session %q is not one of yours: create one with create_sampling_session or save_weights_for_sampler", id)
	}
	return sm, nil
}

func (c *Coordinator) tinkerGetSampler(cl *call) (any, error) {
	sm, err := c.tinkerSampler(cl.account, cl.r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	out := map[string]any{"sampler_id": sm.ID, "base_model": sm.BaseModel}
	if sm.ModelPath != "" {
		out["model_path"] = sm.ModelPath
	}
	return out, nil
}

// sampleReq is an asample to run.
type sampleReq struct {
	Sampler        string                  `json:"sampler"`
	Prompt         []int                   `json:"prompt"`
	NumSamples     int                     `json:"num_samples"`
	Params         protocol.SamplingParams `json:"params"`
	PromptLogprobs bool                    `json:"prompt_logprobs,omitempty"`
	// TopK asks each prompt position's TopK most likely tokens.
	TopK int `json:"top_k,omitempty"`
	// LastN > 0 scores the prompt's last LastN tokens only (the rest null).
	LastN int `json:"last_n,omitempty"`
}

func (c *Coordinator) tinkerSample(cl *call) (any, error) {
	var req struct {
		SamplingSessionID string            `json:"sampling_session_id"`
		BaseModel         string            `json:"base_model"`
		ModelPath         string            `json:"model_path"`
		NumSamples        *int              `json:"num_samples"`
		Prompt            tinker.ModelInput `json:"prompt"`
		SamplingParams    struct {
			MaxTokens   *int            `json:"max_tokens"`
			Seed        *int64          `json:"seed"`
			Stop        json.RawMessage `json:"stop"`
			Temperature *float64        `json:"temperature"`
			TopK        *int            `json:"top_k"`
			TopP        *float64        `json:"top_p"`
		} `json:"sampling_params"`
		PromptLogprobs     *bool `json:"prompt_logprobs"`
		PromptLogprobsLast *int  `json:"prompt_logprobs_last_n"`
		TopkPromptLogprobs int   `json:"topk_prompt_logprobs"`
		TopkSampleLogprobs int   `json:"topk_sample_logprobs"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	if req.TopkSampleLogprobs > 0 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "topk_sample_logprobs is not served by Signal yet: each sampled token's own logprob comes with every sample, and topk_prompt_logprobs scores a prompt's alternatives")
	}
	if k := req.TopkPromptLogprobs; k < 0 || k > maxTopKLogprobs {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "topk_prompt_logprobs is %d: give 1 to %d, or 0 for none", k, maxTopKLogprobs)
	}
	sm, err := c.tinkerSampler(cl.account, req.SamplingSessionID)
	if err != nil {
		return nil, err
	}
	spec, err := c.models.get(sm.BaseModel)
	if err != nil {
		return nil, err
	}
	prompt, err := tinker.PromptTokens(req.Prompt, "prompt")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	sr := sampleReq{Sampler: sm.ID, Prompt: prompt, NumSamples: 1, PromptLogprobs: req.PromptLogprobs != nil && *req.PromptLogprobs,
		TopK: req.TopkPromptLogprobs}
	if n := req.PromptLogprobsLast; n != nil {
		if *n < 1 || *n > len(prompt)-1 {
			return nil, protocol.UserErrorf(ErrInvalidRequest, "prompt_logprobs_last_n is %d for a prompt of %d tokens: give 1 to %d", *n, len(prompt), len(prompt)-1)
		}
		sr.LastN = *n
	}
	if req.NumSamples != nil {
		sr.NumSamples = *req.NumSamples
	}
	sp := req.SamplingParams
	p := protocol.SamplingParams{Temperature: sp.Temperature, TopK: sp.TopK, TopP: sp.TopP, Seed: sp.Seed}
	// max_tokens is optional in Tinker: then the sample runs to a stop or
	// to the model's context.
	p.MaxTokens = spec.ContextLength - len(prompt)
	if sp.MaxTokens != nil {
		p.MaxTokens = *sp.MaxTokens
	}
	if p.MaxTokens < 1 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.max_tokens is %d for a prompt of %d tokens: the model's context is %d tokens; shorten the prompt or give max_tokens >= 1", p.MaxTokens, len(prompt), spec.ContextLength)
	}
	if p.Stop, p.StopTokens, err = stops(sp.Stop); err != nil {
		return nil, err
	}
	// The same checks /v1 sample makes, at the POST.
	check := protocol.SampleRequest{Prompts: []protocol.Prompt{{Tokens: prompt}}, NumSamples: &sr.NumSamples, SamplingParams: p}
	if len(prompt) == 0 {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "prompt has no tokens: give at least one")
	}
	if _, err := validateSample(&check, spec, nil); err != nil {
		return nil, err
	}
	sr.Params = p
	body, _ := json.Marshal(sr)
	id := "sample:" + newID(12)
	seqIDs := make([]string, sr.NumSamples)
	for i := range seqIDs {
		seqIDs[i] = fmt.Sprintf("%s:%d", id, i)
	}
	return c.submit(cl, TinkerFuture{ID: id, Kind: kindSample, Request: body}, map[string]any{"sample_sequence_ids": seqIDs})
}

// stops reads Tinker's stop: a string, a list of strings, or a list of
// token ids.
func stops(raw json.RawMessage) ([]string, []int, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, nil, nil
	}
	var strs []string
	if json.Unmarshal(raw, &strs) == nil {
		return strs, nil, nil
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil {
		return nil, ids, nil
	}
	return nil, nil, protocol.UserErrorf(ErrInvalidRequest, "sampling_params.stop is %s: give a string, a list of strings or a list of token ids", truncate(string(raw), 80))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// ---- futures ----

func (c *Coordinator) tinkerRetrieve(cl *call) (any, error) {
	var req struct {
		RequestID string `json:"request_id"`
	}
	if err := decodeTinker(cl.body, &req); err != nil {
		return nil, err
	}
	poll := c.cfg.TinkerPoll
	if poll <= 0 {
		poll = defaultTinkerPoll
	}
	deadline := time.NewTimer(poll)
	defer deadline.Stop()
	for {
		wake := c.tinkerSig.wait()
		var f TinkerFuture
		var ok bool
		c.fsm.read(func(s *State) { f, ok = s.TinkerFuture(req.RequestID) })
		if !ok || f.Account != cl.account {
			// 410: the SDK sends the call again, which a repeated seq_id
			// answers with its future.
			return nil, protocol.UserErrorf(errGone, "request_id %q is not a future of yours, or its answer was forgotten: send the call again", req.RequestID)
		}
		if f.Status != futurePending {
			return c.futureAnswer(cl, f)
		}
		select {
		case <-wake:
		case <-c.life.Done():
			// This member is stopping: the client polls again (another
			// member, once this one is gone).
			return map[string]any{"type": "try_again", "request_id": f.ID, "queue_state": "active"}, nil
		case <-deadline.C:
			out := map[string]any{"type": "try_again", "request_id": f.ID, "queue_state": "active"}
			if p, ok := c.tinkerPaused.Load(f.ID); ok {
				out["queue_state"], out["queue_state_reason"] = p.(pausedState).state, p.(pausedState).reason
			}
			return out, nil
		case <-cl.r.Context().Done():
			return nil, cl.r.Context().Err()
		}
	}
}

// futureAnswer encodes a finished future as the client asked: protobuf
// for forward_backward and sample results when Accept names it.
func (c *Coordinator) futureAnswer(cl *call, f TinkerFuture) (any, error) {
	if f.Status == futureFailed {
		return map[string]any{"error": f.Error, "category": f.Category}, nil
	}
	wantProto := strings.Contains(cl.r.Header.Get("Accept"), tinker.ProtoContentType)
	switch f.Kind {
	case kindForward, kindForwardBackward:
		var r protocol.ForwardBackwardResponse
		if err := json.Unmarshal(f.Result, &r); err != nil {
			return nil, fmt.Errorf("future %s: %w", f.ID, err)
		}
		if wantProto {
			b, err := tinker.ForwardBackwardOutput(r)
			return rawResponse{status: http.StatusOK, body: b, contentType: tinker.ProtoContentType}, err
		}
		outs := make([]map[string]any, len(r.Logprobs))
		for i, lp := range r.Logprobs {
			outs[i] = map[string]any{"logprobs": map[string]any{"data": lp, "dtype": "float32", "shape": []int{len(lp)}}}
		}
		return map[string]any{"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": outs, "metrics": map[string]float64{"loss:sum": r.LossSum}}, nil
	case kindSample:
		var s sampleResult
		if err := json.Unmarshal(f.Result, &s); err != nil {
			return nil, fmt.Errorf("future %s: %w", f.ID, err)
		}
		plp := make([]float64, len(s.PromptLogprobs))
		for i, v := range s.PromptLogprobs {
			plp[i] = math.NaN()
			if v != nil {
				plp[i] = *v
			}
		}
		if s.PromptLogprobs == nil {
			plp = nil
		}
		if wantProto {
			b, err := tinker.SampleResponse(tinker.Sampled{Samples: s.Samples, PromptLogprobs: plp, TopK: s.TopK, TopIDs: s.TopIDs, TopLogprobs: s.TopLogprobs})
			return rawResponse{status: http.StatusOK, body: b, contentType: tinker.ProtoContentType}, err
		}
		seqs := make([]map[string]any, len(s.Samples))
		for i, smp := range s.Samples {
			seqs[i] = map[string]any{"tokens": smp.Tokens, "logprobs": smp.Logprobs, "stop_reason": smp.StopReason}
		}
		out := map[string]any{"type": "sample", "sequences": seqs, "prompt_logprobs": s.PromptLogprobs}
		if s.TopK > 0 {
			top := make([]any, len(s.TopIDs))
			for p, ids := range s.TopIDs {
				if ids == nil {
					continue // position 0: no context
				}
				pairs := make([][2]any, len(ids))
				for j, id := range ids {
					pairs[j] = [2]any{id, s.TopLogprobs[p][j]}
				}
				top[p] = pairs
			}
			out["topk_prompt_logprobs"] = top
		}
		return out, nil
	}
	return rawResponse{status: http.StatusOK, body: f.Result}, nil
}

// ---- REST side ----

func (c *Coordinator) tinkerRunView(rec *RunRecord, cps []TinkerCheckpoint) map[string]any {
	out := map[string]any{"training_run_id": rec.Run.ID, "base_model": rec.Run.BaseModel, "model_owner": rec.Owner,
		"is_lora": true, "lora_rank": rec.Run.LoRARank, "corrupted": rec.Run.Status == protocol.RunFailed,
		"last_request_time": isoTime(rec.LastActive)}
	for _, cp := range cps {
		view := checkpointView(cp)
		if cp.Type == "sampler" {
			out["last_sampler_checkpoint"] = view
		} else {
			out["last_checkpoint"] = view
		}
	}
	return out
}

// isoTime gives the SDK the ISO 8601 time it validates strictly.
func isoTime(t string) string {
	if t == "" {
		return time.Unix(0, 0).UTC().Format(time.RFC3339)
	}
	return t
}

func checkpointView(cp TinkerCheckpoint) map[string]any {
	seg := map[string]string{"sampler": "sampler_weights", "external": "external_weights"}[cp.Type]
	if seg == "" {
		seg = "weights"
	}
	out := map[string]any{"checkpoint_id": seg + "/" + cp.Name, "checkpoint_type": cp.Type, "time": isoTime(cp.Time),
		"tinker_path": cp.Path, "size_bytes": cp.Size, "public": false}
	if cp.Expires != "" {
		out["expires_at"] = cp.Expires
	}
	return out
}

// tinkerRunOf resolves a training_run_id: a Signal run id or a Tinker
// model id of the caller's.
func (c *Coordinator) tinkerRunOf(account, id string) (*RunRecord, error) {
	var rec *RunRecord
	c.fsm.read(func(s *State) {
		if m, ok := s.TinkerModel(id); ok && m.Account == account {
			id = m.RunID
		}
		if r, ok := s.Run(id); ok && r.Owner == account {
			rec = r
		}
	})
	if rec == nil {
		return nil, protocol.UserErrorf(ErrNotFound, "training run %q is not one of yours: list them with GET /api/v1/training_runs", id)
	}
	return rec, nil
}

func (c *Coordinator) tinkerTrainingRuns(cl *call) (any, error) {
	var runs []map[string]any
	var total int
	c.fsm.read(func(s *State) {
		for _, r := range s.RunsOf(cl.account) {
			runs = append(runs, c.tinkerRunView(r, s.TinkerCheckpointsOf(cl.account, r.Run.ID)))
		}
	})
	total = len(runs)
	if runs == nil {
		runs = []map[string]any{}
	}
	return map[string]any{"training_runs": runs, "cursor": map[string]int{"offset": 0, "limit": total, "total_count": total}}, nil
}

func (c *Coordinator) tinkerTrainingRun(cl *call) (any, error) {
	rec, err := c.tinkerRunOf(cl.account, cl.r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	var cps []TinkerCheckpoint
	c.fsm.read(func(s *State) { cps = s.TinkerCheckpointsOf(cl.account, rec.Run.ID) })
	return c.tinkerRunView(rec, cps), nil
}

func (c *Coordinator) tinkerCheckpoints(cl *call) (any, error) {
	runID := ""
	if id := cl.r.PathValue("id"); id != "" {
		rec, err := c.tinkerRunOf(cl.account, id)
		if err != nil {
			return nil, err
		}
		runID = rec.Run.ID
	}
	var cps []TinkerCheckpoint
	c.fsm.read(func(s *State) { cps = s.TinkerCheckpointsOf(cl.account, runID) })
	out := make([]map[string]any, len(cps))
	for i, cp := range cps {
		out[i] = checkpointView(cp)
	}
	return map[string]any{"checkpoints": out}, nil
}

// tinkerDeleteCheckpoint forgets a checkpoint's tinker:// name. The Signal
// checkpoint behind it stays with its run (its storage is collected with
// the run's, and /v1 may still name it).
func (c *Coordinator) tinkerDeleteCheckpoint(cl *call) (any, error) {
	rec, err := c.tinkerRunOf(cl.account, cl.r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	path := fmt.Sprintf("tinker://%s/%s/%s", rec.Run.ID, cl.r.PathValue("kind"), cl.r.PathValue("name"))
	if _, _, err := c.tinkerCheckpointOf(cl.account, path, "checkpoint"); err != nil {
		return nil, err
	}
	if _, err := c.propose(cl.r.Context(), cmdTinker, tinkerCmd{DeleteCheckpoints: []string{path}}); err != nil {
		return nil, err
	}
	return map[string]any{}, nil
}

// tinkerWake tells the leader's queue runner to look now.
func (c *Coordinator) tinkerWake() {
	select {
	case c.tinkerKick <- struct{}{}:
	default:
	}
}

// decodeTinker reads a Tinker JSON body. The SDK sends fields Signal does
// not read (type tags, telemetry hints), so unknown fields are allowed.
func decodeTinker(body []byte, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return protocol.UserErrorf(ErrInvalidRequest, "the request body does not decode as this call's JSON: %v", err)
	}
	return nil
}
