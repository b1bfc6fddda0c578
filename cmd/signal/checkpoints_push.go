package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// newCheckpointsPushCmd is signal checkpoints push: a checkpoint's adapter
// to a Hugging Face Hub repository, through the coordinator (which reads
// the checkpoint from the network's store, verified by its CIDs). The token
// comes from $HF_TOKEN, never a flag: argv shows in ps.
func newCheckpointsPushCmd() *cobra.Command {
	var repo, message string
	var public bool
	cmd := userCmd("push CHECKPOINT_ID --repo OWNER/NAME", "Push a checkpoint's adapter (PEFT files and a model card) to the Hugging Face Hub, with the token in $HF_TOKEN", exactArgs(1),
		func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
			if repo == "" {
				return usageErrorf("--repo is required: the Hub repository as owner/name")
			}
			token := os.Getenv("HF_TOKEN")
			if token == "" {
				return usageErrorf("HF_TOKEN is not set: export a Hugging Face token with write access to %s (huggingface.co/settings/tokens)", repo)
			}
			private := !public
			res, err := c.PushCheckpoint(ctx, args[0], protocol.PushRequest{Repo: repo, Token: token, Private: &private, CommitMessage: message})
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, res)
			}
			fmt.Fprintf(out, "checkpoint %s pushed to %s\n  commit %s\n", res.Checkpoint, res.URL, res.CommitURL)
			for _, f := range res.Files {
				how := "sent"
				if !f.Sent {
					how = "held by the Hub already"
				}
				cid := f.CID
				if cid == "" {
					cid = "(written by the push)"
				}
				fmt.Fprintf(out, "  %-28s %10s  %-24s cid %s\n", f.Name, bytesHuman(f.Size), how, cid)
			}
			return nil
		})
	cmd.Flags().StringVar(&repo, "repo", "", "the Hub model repository, owner/name (created if it does not exist)")
	cmd.Flags().BoolVar(&public, "public", false, "create the repository public (default: private; an existing one keeps its visibility)")
	cmd.Flags().StringVarP(&message, "message", "m", "", "the commit message (default: one naming the checkpoint, run and step)")
	return cmd
}
