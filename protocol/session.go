package protocol

import "encoding/json"

// SessionProtocolID is the libp2p protocol a node serves run sessions on.
const SessionProtocolID = "/signal/session/1"

// Call names one session operation. The coordinator proxies a public run
// call to the run's node as a Call with the API request's JSON body; the node
// answers with the API response's JSON body (without cost/balance, which the
// coordinator adds after billing the Usage the node reports).
type Call string

// The session calls, in the order a run's life meets them.
const (
	CallInit            Call = "init"
	CallForwardBackward Call = "forward_backward"
	CallForward         Call = "forward"
	CallOptimStep       Call = "optim_step"
	CallSample          Call = "sample"
	CallSaveState       Call = "save_state"
	CallLoadState       Call = "load_state"
	CallClose           Call = "close"
)

// SessionSpec is what a node needs to open (or reopen, after failover) a
// run's session: the body of a CallInit.
type SessionSpec struct {
	RunID           string          `json:"run_id"`
	BaseModel       string          `json:"base_model"`
	LoRARank        int             `json:"lora_rank"`
	LoRAAlpha       float64         `json:"lora_alpha"`
	TargetModules   []string        `json:"target_modules"`
	Seed            int64           `json:"seed"`
	CheckpointEvery int             `json:"checkpoint_every"`
	LRSchedule      json.RawMessage `json:"lr_schedule,omitempty"`
	// ResumeFrom, when set, is a checkpoint (full mode) the node restores
	// before answering: used when a run moves off a lost node.
	ResumeFrom *Checkpoint `json:"resume_from,omitempty"`
	// RandomModel, when set, asks the node to generate the session's base
	// model instead of opening one it serves: a capacity challenge's.
	RandomModel *RandomModel `json:"random_model,omitempty"`
}

// RandomModel is a Llama-shaped model with random weights drawn from Seed
// (trainer.GenerateRandomModel): every node generates the same bytes, so
// two nodes' answers on it are comparable, and no node can have answers
// ready before the seed is drawn.
type RandomModel struct {
	Seed             int64 `json:"seed"`
	HiddenSize       int   `json:"hidden_size"`
	IntermediateSize int   `json:"intermediate_size"`
	Layers           int   `json:"num_hidden_layers"`
	Heads            int   `json:"num_attention_heads"`
	KVHeads          int   `json:"num_key_value_heads"`
	VocabSize        int   `json:"vocab_size"`
	Context          int   `json:"max_position_embeddings"`
}

// Params is the model's weight count (untied head).
func (m RandomModel) Params() int64 {
	h, i, v := int64(m.HiddenSize), int64(m.IntermediateSize), int64(m.VocabSize)
	kv := h / max(1, int64(m.Heads)) * int64(m.KVHeads)
	layer := 2*h*h + 2*h*kv + 3*h*i + 2*h
	return 2*v*h + int64(m.Layers)*layer + h
}

// Usage is what a node reports it did for one call; the coordinator bills it
// at the model's prices.
type Usage struct {
	TrainTokens   int64 `json:"train_tokens,omitempty"`
	PrefillTokens int64 `json:"prefill_tokens,omitempty"`
	SampledTokens int64 `json:"sampled_tokens,omitempty"`
	// StoredBytes is the size of checkpoint files written by the call.
	StoredBytes int64 `json:"stored_bytes,omitempty"`
}

// Figures are a compute call's training figures, typed, beside Usage: the
// coordinator keeps them in the run record without reading the body.
// forward_backward and forward set LossSum, WeightSum (the sum of the loss
// weights, so several calls' losses combine into one mean) and Tokens, and
// forward_backward GradNorm; optim_step sets Step, LearningRate and GradNorm.
type Figures struct {
	LossSum      float64  `json:"loss_sum,omitempty"`
	WeightSum    float64  `json:"weight_sum,omitempty"`
	Tokens       int64    `json:"tokens,omitempty"`
	Step         int      `json:"step,omitempty"`
	LearningRate float64  `json:"learning_rate,omitempty"`
	GradNorm     *float64 `json:"grad_norm,omitempty"`
}

// SessionRequest is one call on a run's session.
type SessionRequest struct {
	// RequestID makes a call idempotent: a node executes a repeated
	// RequestID once and answers it from the first result.
	RequestID string          `json:"request_id"`
	RunID     string          `json:"run_id"`
	Call      Call            `json:"call"`
	Body      json.RawMessage `json:"body,omitempty"`
}

// SessionResponse answers a SessionRequest. Exactly one of Body and Error is set.
type SessionResponse struct {
	RequestID string          `json:"request_id"`
	Body      json.RawMessage `json:"body,omitempty"`
	Usage     Usage           `json:"usage"`
	Figures   *Figures        `json:"figures,omitempty"`
	// Checkpoint is set when the call wrote one (save_state, or an automatic
	// checkpoint taken after an optim_step): the coordinator records it.
	Checkpoint *Checkpoint `json:"checkpoint,omitempty"`
	Error      *ErrorBody  `json:"error,omitempty"`
}
