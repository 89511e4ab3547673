// SPDX-License-Identifier: GPL-2.0
/* Scenario "wrap": the new function calls the function it replaces and builds on its result. */
#include "livepatch.h"

static int (*orig_lp_target_value)(void);

static int wrapped_lp_target_value(void)
{
	return orig_lp_target_value() * 100 + 5;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_value", wrapped_lp_target_value)),
		LP_SYMBOLS(LP_SYMBOL(orig_lp_target_value, "lp_target:lp_target_value")));
