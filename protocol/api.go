// Package protocol holds Signal's wire types: the public HTTP API's JSON
// shapes (../shared/API.md) and the node session messages. It imports only
// the standard library so that every other part can depend on it.
package protocol

import "encoding/json"

// APIVersionPrefix is the path prefix of every public API call.
const APIVersionPrefix = "/v1"

// MicroCredits is an amount of money: 1 credit = 1,000,000 micro-credits.
// Every amount the API carries is an integer of them, in a field whose name
// says so (money.go keeps the older names answered for one release).
type MicroCredits = int64

// Error codes of the public API (API.md, "Status codes and error codes").
const (
	CodeInvalidRequest      = "invalid_request"
	CodeUnknownModel        = "unknown_model"
	CodeUnauthorized        = "unauthorized"
	CodeInsufficientBalance = "insufficient_balance"
	CodeForbidden           = "forbidden"
	CodeNotFound            = "not_found"
	CodeConflict            = "conflict"
	CodeTooLarge            = "too_large"
	CodeRateLimited         = "rate_limited"
	CodeUnavailable         = "unavailable"
	// CodeOutOfMemory is a node's answer when a session's model does not
	// fit the memory it has (never a user's: the coordinator places the
	// run elsewhere and notes what the node could not hold).
	CodeOutOfMemory = "out_of_memory"
	CodeInternal    = "internal"
)

// ErrorBody is the inner object of an error response.
type ErrorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// ErrorResponse is every non-2xx response body: {"error": {...}}.
type ErrorResponse struct {
	Error ErrorBody `json:"error"`
}

// LossFnInputs are the per-token inputs of a loss function.
type LossFnInputs struct {
	TargetTokens []int     `json:"target_tokens"`
	Weights      []float64 `json:"weights"`
	Logprobs     []float64 `json:"logprobs,omitempty"`
	Advantages   []float64 `json:"advantages,omitempty"`
}

// ModelInput is a tokenized sequence.
type ModelInput struct {
	Tokens []int `json:"tokens"`
}

// Datum is one training sequence.
type Datum struct {
	ModelInput   ModelInput   `json:"model_input"`
	LossFnInputs LossFnInputs `json:"loss_fn_inputs"`
}

// TextExample is a training example as text, tokenized on the node:
// either Text, or Prompt + Completion (weights 0 on the prompt, 1 on the completion).
type TextExample struct {
	Text       string `json:"text,omitempty"`
	Prompt     string `json:"prompt,omitempty"`
	Completion string `json:"completion,omitempty"`
}

// AdamParams configure one optimizer step; nil fields take the defaults.
type AdamParams struct {
	LearningRate *float64 `json:"learning_rate,omitempty"`
	Beta1        *float64 `json:"beta1,omitempty"`
	Beta2        *float64 `json:"beta2,omitempty"`
	Eps          *float64 `json:"eps,omitempty"`
	WeightDecay  *float64 `json:"weight_decay,omitempty"`
	GradClipNorm *float64 `json:"grad_clip_norm,omitempty"`
}

// SamplingParams configure sampling. Nil optional fields take the defaults
// (temperature 1, top_k -1 = off, top_p 1).
type SamplingParams struct {
	MaxTokens   int      `json:"max_tokens"`
	Temperature *float64 `json:"temperature,omitempty"`
	TopK        *int     `json:"top_k,omitempty"`
	TopP        *float64 `json:"top_p,omitempty"`
	Stop        []string `json:"stop,omitempty"`
	// StopTokens end a sample at any of these ids (kept in its tokens),
	// besides the model's end-of-sequence ids.
	StopTokens []int  `json:"stop_tokens,omitempty"`
	Seed       *int64 `json:"seed,omitempty"`
}

// Prompt is a sampling prompt: Tokens, or Text tokenized on the node.
type Prompt struct {
	Tokens []int  `json:"tokens,omitempty"`
	Text   string `json:"text,omitempty"`
}

// Sample is one sampled continuation.
type Sample struct {
	Tokens     []int     `json:"tokens"`
	Text       string    `json:"text"`
	Logprobs   []float64 `json:"logprobs"`
	StopReason string    `json:"stop_reason"`
}

// Cost is what one call was charged. On the wire it is
// {"micro_credits", "credits" (deprecated, the same micro-credits), ...}.
type Cost struct {
	MicroCredits  MicroCredits `json:"micro_credits"`
	TrainTokens   int64        `json:"train_tokens,omitempty"`
	PrefillTokens int64        `json:"prefill_tokens,omitempty"`
	SampledTokens int64        `json:"sampled_tokens,omitempty"`
}

// CheckpointFile is one stored file of a checkpoint, named by its CID.
type CheckpointFile struct {
	Name string `json:"name"`
	CID  string `json:"cid"`
	Size int64  `json:"size"`
	URI  string `json:"uri"`
}

// Checkpoint is a saved adapter ("adapter") or adapter + optimizer ("full").
type Checkpoint struct {
	ID        string           `json:"id"`
	RunID     string           `json:"run_id"`
	Step      int              `json:"step"`
	Mode      string           `json:"mode"`
	URI       string           `json:"uri"`
	Files     []CheckpointFile `json:"files"`
	CreatedAt string           `json:"created_at"`
	// Node is the peer that made it (the coordinator records it): a move
	// off a node a failed audit quarantined resumes from a checkpoint its
	// passed audits cover, or one another node made.
	Node string `json:"node,omitempty"`
}

// CheckpointFileURL is one file of a checkpoint with a signed URL to
// download it from a coordinator.
type CheckpointFileURL struct {
	Name string `json:"name"`
	CID  string `json:"cid"`
	Size int64  `json:"size"`
	URL  string `json:"url"`
}

// CheckpointFiles answers GET /v1/checkpoints/{id}/files: the URLs are
// valid until Expires (RFC 3339).
type CheckpointFiles struct {
	Checkpoint Checkpoint          `json:"checkpoint"`
	Files      []CheckpointFileURL `json:"files"`
	Expires    string              `json:"expires"`
}

// Metrics are one optimizer step's figures.
type Metrics struct {
	Step         int      `json:"step"`
	LossMean     *float64 `json:"loss_mean,omitempty"`
	GradNorm     *float64 `json:"grad_norm,omitempty"`
	LearningRate *float64 `json:"learning_rate,omitempty"`
	Tokens       int64    `json:"tokens,omitempty"`
	Time         string   `json:"time"`
}

// Run statuses.
const (
	RunStarting = "starting"
	RunReady    = "ready"
	RunMoving   = "moving"
	RunEnded    = "ended"
	RunFailed   = "failed"
)

// Run is a training run as the API shows it.
type Run struct {
	ID              string   `json:"id"`
	Name            string   `json:"name,omitempty"`
	BaseModel       string   `json:"base_model"`
	LoRARank        int      `json:"lora_rank"`
	LoRAAlpha       float64  `json:"lora_alpha"`
	TargetModules   []string `json:"target_modules"`
	Status          string   `json:"status"`
	Node            string   `json:"node,omitempty"`
	Step            int      `json:"step"`
	CheckpointEvery int      `json:"checkpoint_every"`
	ResumedFromStep *int     `json:"resumed_from_step,omitempty"`
	// SpentMicroCredits is what the run's calls cost (also answered as
	// "spent", its deprecated name).
	SpentMicroCredits MicroCredits `json:"spent_micro_credits"`
	CreatedAt         string       `json:"created_at"`
	Checkpoints       []Checkpoint `json:"checkpoints,omitempty"`
	LastMetrics       *Metrics     `json:"last_metrics,omitempty"`
	// StatusReason says why a run failed, or why the network ended it
	// (idle for too long).
	StatusReason string `json:"status_reason,omitempty"`
}

// LRSchedule is a learning-rate schedule set when a run is created; an
// optim_step that names no rate uses it. Kind is "constant", "linear" or
// "cosine"; warmup is linear from 0 over WarmupSteps; decay runs to
// FinalFraction × PeakLR at TotalSteps.
type LRSchedule struct {
	Kind          string  `json:"kind"`
	PeakLR        float64 `json:"peak_lr"`
	WarmupSteps   int     `json:"warmup_steps,omitempty"`
	TotalSteps    int     `json:"total_steps,omitempty"`
	FinalFraction float64 `json:"final_fraction,omitempty"`
}

// CreateRunRequest is the body of POST /v1/runs.
type CreateRunRequest struct {
	BaseModel       string      `json:"base_model"`
	LoRARank        *int        `json:"lora_rank,omitempty"`
	LoRAAlpha       *float64    `json:"lora_alpha,omitempty"`
	TargetModules   []string    `json:"target_modules,omitempty"`
	Seed            *int64      `json:"seed,omitempty"`
	CheckpointEvery *int        `json:"checkpoint_every,omitempty"`
	LRSchedule      *LRSchedule `json:"lr_schedule,omitempty"`
	Name            string      `json:"name,omitempty"`
}

// RunList is the body of GET /v1/runs.
type RunList struct {
	Runs []Run `json:"runs"`
}

// ForwardBackwardRequest is the body of forward_backward and forward.
type ForwardBackwardRequest struct {
	Data         []Datum            `json:"data,omitempty"`
	Examples     []TextExample      `json:"examples,omitempty"`
	LossFn       string             `json:"loss_fn,omitempty"`
	LossFnConfig map[string]float64 `json:"loss_fn_config,omitempty"`
	// TopKLogprobs (forward only, 1..20) asks each position's K most
	// likely next tokens with their logprobs too.
	TopKLogprobs int `json:"top_k_logprobs,omitempty"`
}

// TopLogprobs are one datum's most likely next tokens: per position, K ids
// and their logprobs, most likely first.
type TopLogprobs struct {
	IDs      [][]int     `json:"ids"`
	Logprobs [][]float64 `json:"logprobs"`
}

// ForwardBackwardResponse answers forward_backward (and forward, without GradNorm).
type ForwardBackwardResponse struct {
	LossSum  float64     `json:"loss_sum"`
	LossMean float64     `json:"loss_mean"`
	Tokens   int64       `json:"tokens"`
	GradNorm *float64    `json:"grad_norm,omitempty"`
	Logprobs [][]float64 `json:"logprobs"`
	// TopLogprobs answers TopKLogprobs, one per datum.
	TopLogprobs []TopLogprobs `json:"top_logprobs,omitempty"`
	// PendingBatches is how many forward_backward calls (this one included)
	// have gradients waiting for the next optim_step.
	PendingBatches int `json:"pending_batches,omitempty"`
	Billed
}

// Billed is embedded in every billed response: what the call cost and the
// account's balance after it.
type Billed struct {
	Cost                *Cost         `json:"cost,omitempty"`
	BalanceMicroCredits *MicroCredits `json:"balance_micro_credits,omitempty"`
	// Deprecated: Balance is BalanceMicroCredits under its old name; servers
	// answer both until v0.3. Read BalanceMicroCredits (the Go SDK fills it
	// from Balance when an older server sends only that).
	Balance *MicroCredits `json:"balance,omitempty"`
}

// OptimStepRequest is the body of optim_step.
type OptimStepRequest struct {
	AdamParams *AdamParams `json:"adam_params,omitempty"`
}

// OptimStepResponse answers optim_step.
type OptimStepResponse struct {
	Step         int     `json:"step"`
	LearningRate float64 `json:"learning_rate"`
	GradNorm     float64 `json:"grad_norm"`
	Billed
}

// SampleRequest is the body of sample.
type SampleRequest struct {
	Prompts        []Prompt       `json:"prompts"`
	NumSamples     *int           `json:"num_samples,omitempty"`
	SamplingParams SamplingParams `json:"sampling_params"`
}

// SampleResponse answers sample: one list of samples per prompt.
type SampleResponse struct {
	Samples [][]Sample `json:"samples"`
	Billed
}

// SaveStateRequest is the body of save_state.
type SaveStateRequest struct {
	Mode string `json:"mode,omitempty"`
	Name string `json:"name,omitempty"`
}

// SaveStateResponse answers save_state.
type SaveStateResponse struct {
	Checkpoint Checkpoint `json:"checkpoint"`
	Billed
}

// PipelineCall is one call of a pipeline: Call names it (forward,
// forward_backward, optim_step, sample or save_state) and Body is its
// request body, as the call's own route takes it.
type PipelineCall struct {
	Call string          `json:"call"`
	Body json.RawMessage `json:"body,omitempty"`
}

// PipelineRequest is the body of POST /v1/runs/{id}/pipeline: calls the
// run makes in order, in one round trip (a training step's
// forward_backward and optim_step).
type PipelineRequest struct {
	Calls []PipelineCall `json:"calls"`
}

// PipelineResponse answers a pipeline: each call's answer, billed as its
// own route answers it, in order.
type PipelineResponse struct {
	Results []json.RawMessage `json:"results"`
}

// LoadStateRequest is the body of load_state: a checkpoint id, URI or CID.
type LoadStateRequest struct {
	Checkpoint string `json:"checkpoint"`
	// WeightsOnly loads the adapter alone: a full checkpoint's optimizer
	// moments and step are left behind, and the run's optimizer starts
	// fresh (Tinker's load_state without optimizer).
	WeightsOnly bool `json:"weights_only,omitempty"`
}

// MetricsResponse is the body of GET /v1/runs/{id}/metrics.
type MetricsResponse struct {
	Metrics []Metrics `json:"metrics"`
}

// TokenizeRequest is the body of POST /v1/tokenize.
type TokenizeRequest struct {
	BaseModel        string `json:"base_model"`
	Text             string `json:"text"`
	AddSpecialTokens bool   `json:"add_special_tokens,omitempty"`
}

// TokenizeResponse answers tokenize.
type TokenizeResponse struct {
	Tokens []int `json:"tokens"`
}

// Prices are micro-credits per 1K tokens, and per GB-hour of stored
// checkpoints. Each is also answered (and read) under its deprecated name
// without the unit: train_per_1k, prefill_per_1k, sample_per_1k,
// storage_per_gb_hour.
type Prices struct {
	TrainMicroCreditsPer1K       MicroCredits `json:"train_micro_credits_per_1k"`
	PrefillMicroCreditsPer1K     MicroCredits `json:"prefill_micro_credits_per_1k"`
	SampleMicroCreditsPer1K      MicroCredits `json:"sample_micro_credits_per_1k"`
	StorageMicroCreditsPerGBHour MicroCredits `json:"storage_micro_credits_per_gb_hour"`
}

// Model is a supported base model.
type Model struct {
	Name          string `json:"name"`
	ContextLength int    `json:"context_length"`
	MemoryBytes   int64  `json:"memory_bytes"`
	Prices        Prices `json:"prices"`
}

// ModelList is the body of GET /v1/models.
type ModelList struct {
	Models []Model `json:"models"`
}

// Charge is one ledger charge as the account shows it (micro_credits is
// also answered as "credits", its deprecated name).
type Charge struct {
	RunID        string       `json:"run_id"`
	Call         string       `json:"call"`
	MicroCredits MicroCredits `json:"micro_credits"`
	Time         string       `json:"time"`
}

// Account is the body of GET /v1/account (balance_micro_credits and
// spent_micro_credits are also answered as "balance" and "spent", their
// deprecated names).
type Account struct {
	Account             string       `json:"account"`
	BalanceMicroCredits MicroCredits `json:"balance_micro_credits"`
	SpentMicroCredits   MicroCredits `json:"spent_micro_credits"`
	Charges             []Charge     `json:"charges"`
	// Operator is set for an account that node operators earn for.
	Operator *OperatorEarnings `json:"operator,omitempty"`
}

// GPU is one GPU as a node advertises it.
type GPU struct {
	Name              string  `json:"name"`
	UUID              string  `json:"uuid"`
	MemoryTotal       int64   `json:"memory_total"`
	MemoryFree        int64   `json:"memory_free"`
	Utilization       float64 `json:"utilization"`
	ComputeCapability string  `json:"compute_capability,omitempty"`
}

// CPU is a node's CPU capacity, advertised when it has no GPU.
type CPU struct {
	Cores       int   `json:"cores"`
	MemoryTotal int64 `json:"memory_total"`
}

// Node is a live node as GET /v1/nodes shows it; it is also the payload of
// a node's capacity advert.
type Node struct {
	PeerID      string   `json:"peer_id"`
	Addrs       []string `json:"addrs"`
	GPUs        []GPU    `json:"gpus"`
	CPU         CPU      `json:"cpu"`
	Backends    []string `json:"backends"`
	Models      []string `json:"models"`
	Sessions    int      `json:"sessions"`
	MaxSessions int      `json:"max_sessions"`
	// ModelMemory is the memory, in bytes, each model in Models holds on
	// this node once loaded, as its engine keeps it (a BF16 file on the
	// native engine: 2 bytes a parameter): placement prefers it to the
	// coordinator's estimate from file sizes. Absent for engines that do
	// not know.
	ModelMemory map[string]int64 `json:"model_memory,omitempty"`
	LastSeen    string           `json:"last_seen"`
	// Operator is the account the node's earnings go to.
	Operator string `json:"operator,omitempty"`
	// Audits is what the network checked of the node's work (set by the
	// coordinator in GET /v1/nodes; never taken from an advert).
	Audits *NodeAudits `json:"audits,omitempty"`
}

// NodeList is the body of GET /v1/nodes.
type NodeList struct {
	Nodes []Node `json:"nodes"`
}

// Health is the body of GET /v1/health.
type Health struct {
	Status  string `json:"status"`
	Leader  bool   `json:"leader"`
	Version string `json:"version"`
}

// CreateKeyRequest is the body of POST /v1/admin/keys: a new account
// funded with MicroCredits.
type CreateKeyRequest struct {
	MicroCredits MicroCredits `json:"micro_credits,omitempty"`
	// Deprecated: Credits is MicroCredits under its old name (micro-credits
	// despite it), accepted until v0.3; a request may set one of the two, or
	// both to the same amount.
	Credits MicroCredits `json:"credits,omitempty"`
	Name    string       `json:"name,omitempty"`
}

// CreateKeyResponse answers POST /v1/admin/keys. KeyID names the key in
// GET /v1/admin/keys and DELETE /v1/admin/keys/{id}; APIKey is shown once.
type CreateKeyResponse struct {
	APIKey  string `json:"api_key"`
	Account string `json:"account"`
	KeyID   string `json:"key_id,omitempty"`
}

// Key is an API key as the admin API lists it: never the secret itself.
type Key struct {
	ID        string `json:"id"`
	Account   string `json:"account"`
	Name      string `json:"name,omitempty"`
	CreatedAt string `json:"created_at"`
}

// KeyList is the body of GET /v1/admin/keys (?account= narrows it).
type KeyList struct {
	Keys []Key `json:"keys"`
}

// CreditRequest is the body of POST /v1/admin/credit: MicroCredits added
// to Account.
type CreditRequest struct {
	Account      string       `json:"account"`
	MicroCredits MicroCredits `json:"micro_credits,omitempty"`
	// Deprecated: Amount is MicroCredits under its old name, accepted until
	// v0.3; a request may set one of the two, or both to the same amount.
	Amount MicroCredits `json:"amount,omitempty"`
}

// CreditResponse answers POST /v1/admin/credit (balance_micro_credits is
// also answered as "balance", its deprecated name).
type CreditResponse struct {
	Account             string       `json:"account"`
	BalanceMicroCredits MicroCredits `json:"balance_micro_credits"`
}

// LiftQuarantineRequest is the body of POST
// /v1/admin/nodes/{peer}/lift_quarantine.
type LiftQuarantineRequest struct {
	Reason string `json:"reason"`
}

// JoinTokenRequest is the body of POST /v1/admin/join_tokens.
type JoinTokenRequest struct {
	OperatorAccount string `json:"operator_account,omitempty"`
}

// JoinTokenResponse answers POST /v1/admin/join_tokens.
type JoinTokenResponse struct {
	JoinToken       string `json:"join_token"`
	OperatorAccount string `json:"operator_account"`
}
