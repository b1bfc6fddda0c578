package protocol

import "fmt"

// PushRequest is POST /v1/checkpoints/{id}/push: a checkpoint's adapter
// (its PEFT files and a generated model card) committed to a Hugging Face
// Hub model repository, created if it does not exist.
type PushRequest struct {
	// Repo is the repository, "owner/name".
	Repo string `json:"repo"`
	// Private makes a repository the push creates private; nil means
	// true (an existing repository keeps its visibility).
	Private *bool `json:"private,omitempty"`
	// Token is a Hub token with write access to Repo. It is used for this
	// call only: never logged, recorded in raft or stored with the
	// checkpoint.
	Token string `json:"token"`
	// CommitMessage is the commit's summary (default: one naming the
	// checkpoint).
	CommitMessage string `json:"commit_message,omitempty"`
}

// IsPrivate is Private with its default.
func (r PushRequest) IsPrivate() bool { return r.Private == nil || *r.Private }

// String leaves the token out, wherever the request is printed.
func (r PushRequest) String() string {
	return fmt.Sprintf("push to %s (private %v, token %d characters, message %q)", r.Repo, r.IsPrivate(), len(r.Token), r.CommitMessage)
}

// GoString is String, for %#v.
func (r PushRequest) GoString() string { return r.String() }

// PushedFile is one file of a push.
type PushedFile struct {
	// Name is the file's path in the repository.
	Name string `json:"name"`
	Size int64  `json:"size"`
	// CID names the checkpoint's file (empty for the model card, which
	// the push writes).
	CID string `json:"cid,omitempty"`
	// Sent is false for a file the Hub held already (uploaded by an
	// earlier, interrupted push of the same content): a push that failed
	// resumes where it stopped.
	Sent bool `json:"sent"`
}

// PushResponse answers a push: the Hub's commit.
type PushResponse struct {
	Checkpoint string `json:"checkpoint"`
	Repo       string `json:"repo"`
	// URL is the repository's page.
	URL       string       `json:"url"`
	CommitURL string       `json:"commit_url"`
	CommitOID string       `json:"commit_oid"`
	Files     []PushedFile `json:"files"`
}
