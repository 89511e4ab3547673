// SPDX-License-Identifier: GPL-2.0
/* Scenario "module loaded before": a function of lp_target. */
#include "livepatch.h"

static int new_lp_target_value(void)
{
	return 2;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_value", new_lp_target_value)),
		LP_NO_SYMBOLS);
