package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/internal/version"
)

// subcommands holds the constructors that each subcommand's file registers
// from its init function, so that adding a subcommand touches one file only.
var subcommands []func() *cobra.Command

// register adds a subcommand constructor; call it from an init function.
func register(f func() *cobra.Command) { subcommands = append(subcommands, f) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "signal",
		Short: "Signal: fine-tune language models on a peer-to-peer network of GPU machines",
		Long: `Signal runs LoRA fine-tuning calls (forward_backward, optim_step, sample,
save_state) on GPU nodes of a peer-to-peer network, behind a raft-replicated
coordinator that authenticates, rate-limits and bills each call.

Commands that call the API find the coordinators in --url (several,
comma-separated, are tried in turn), --testnet FILE|DIR, $SIGNAL_URL or
$SIGNAL_TESTNET, and authenticate with --api-key or $SIGNAL_API_KEY (user
commands) or the admin token ($SIGNAL_ADMIN_TOKEN; admin commands); a
testnet file gives both. Amounts are in credits (1 credit = 1,000,000
micro-credits, the API's unit); --credits takes a decimal number of credits
on every command.

` + exitStatusHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newVersionCmd())
	for _, f := range subcommands {
		root.AddCommand(f())
	}
	markRuns(root)
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Signal's version and the Go version it was built with",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "signal %s (%s)\n", version.Version, version.Go())
			return err
		},
	}
}

// warnSecretFlags warns, for each named flag the user set, that its value
// is visible to every user of the host (ps, /proc) and names the
// environment variable that is not.
func warnSecretFlags(cmd *cobra.Command, flagToEnv map[string]string) {
	for flag, env := range flagToEnv {
		if cmd.Flags().Changed(flag) {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: --%s is visible to other users of this host (ps); set $%s instead\n", flag, env)
		}
	}
}
