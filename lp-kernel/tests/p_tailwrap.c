// SPDX-License-Identifier: GPL-2.0
/*
 * Scenario "wrap", tail-call form: `return orig();` would compile to a jump (the caller seen by
 * ftrace would be outside the patch module, and the call would be redirected back here forever)
 * unless sibling-call optimisation is off, which the kbuild template and `livepatch kernel pack`
 * ensure.
 */
#include "livepatch.h"

static int (*orig_lp_target_value)(void);

static int tail_wrapped_lp_target_value(void)
{
	return orig_lp_target_value();
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_value", tail_wrapped_lp_target_value)),
		LP_SYMBOLS(LP_SYMBOL(orig_lp_target_value, "lp_target:lp_target_value")));
