//! Watch, Lease and Auth: etcd services Regatta does not implement. Every
//! method answers UNIMPLEMENTED with a message naming it, so that etcd
//! clients and etcdctl fail clearly instead of with a bare status.

use tonic::{Request, Response, Status, Streaming};

use crate::proto::etcdserverpb as pb;

/// The services nobody implements here.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unimplemented;

fn refuse(method: &str) -> Status {
    Status::unimplemented(format!(
        "Regatta does not implement etcd's {method}; docs/api.md lists what it serves"
    ))
}

#[tonic::async_trait]
impl pb::watch_server::Watch for Unimplemented {
    type WatchStream = tokio_stream::Empty<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(refuse("Watch.Watch"))
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for Unimplemented {
    type LeaseKeepAliveStream = tokio_stream::Empty<Result<pb::LeaseKeepAliveResponse, Status>>;

    async fn lease_grant(
        &self,
        _request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        Err(refuse("Lease.LeaseGrant"))
    }

    async fn lease_revoke(
        &self,
        _request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        Err(refuse("Lease.LeaseRevoke"))
    }

    async fn lease_keep_alive(
        &self,
        _request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Err(refuse("Lease.LeaseKeepAlive"))
    }

    async fn lease_time_to_live(
        &self,
        _request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        Err(refuse("Lease.LeaseTimeToLive"))
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        Err(refuse("Lease.LeaseLeases"))
    }
}

/// etcd's Auth service: only `Authenticate` and `AuthStatus`, so that
/// etcd clients given a user (`etcdctl --user root:<token>`) can present
/// the admin token (`docs/security.md`). Users and roles are not
/// implemented.
#[derive(Clone)]
pub struct AuthApi {
    node: std::sync::Arc<crate::Node>,
}

impl AuthApi {
    /// The Auth service of `node`.
    pub fn new(node: std::sync::Arc<crate::Node>) -> AuthApi {
        AuthApi { node }
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthApi {
    async fn auth_enable(
        &self,
        _request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        Err(refuse("Auth.AuthEnable"))
    }

    async fn auth_disable(
        &self,
        _request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        Err(refuse("Auth.AuthDisable"))
    }

    /// Enabled when the node has an admin token.
    async fn auth_status(
        &self,
        _request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        Ok(Response::new(pb::AuthStatusResponse {
            header: None,
            enabled: self.node.config().admin_token.is_some(),
            auth_revision: 0,
        }))
    }

    /// User `root` with the admin token as its password gets the token
    /// back, which etcd clients then send as their `token` header.
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let Some(token) = &self.node.config().admin_token else {
            return Err(Status::failed_precondition(
                "etcdserver: authentication is not enabled (start the node with --api.admin-token-file)",
            ));
        };
        let request = request.into_inner();
        if request.name != "root" || !token.matches(request.password.as_bytes()) {
            tracing::warn!(user = %request.name, "refused an authentication");
            return Err(Status::invalid_argument(
                "etcdserver: authentication failed, invalid user ID or password (the user is root, the password the admin token)",
            ));
        }
        Ok(Response::new(pb::AuthenticateResponse {
            header: None,
            token: request.password,
        }))
    }

    async fn user_add(
        &self,
        _request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        Err(refuse("Auth.UserAdd"))
    }

    async fn user_get(
        &self,
        _request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        Err(refuse("Auth.UserGet"))
    }

    async fn user_list(
        &self,
        _request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        Err(refuse("Auth.UserList"))
    }

    async fn user_delete(
        &self,
        _request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        Err(refuse("Auth.UserDelete"))
    }

    async fn user_change_password(
        &self,
        _request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        Err(refuse("Auth.UserChangePassword"))
    }

    async fn user_grant_role(
        &self,
        _request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        Err(refuse("Auth.UserGrantRole"))
    }

    async fn user_revoke_role(
        &self,
        _request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        Err(refuse("Auth.UserRevokeRole"))
    }

    async fn role_add(
        &self,
        _request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        Err(refuse("Auth.RoleAdd"))
    }

    async fn role_get(
        &self,
        _request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        Err(refuse("Auth.RoleGet"))
    }

    async fn role_list(
        &self,
        _request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        Err(refuse("Auth.RoleList"))
    }

    async fn role_delete(
        &self,
        _request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        Err(refuse("Auth.RoleDelete"))
    }

    async fn role_grant_permission(
        &self,
        _request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        Err(refuse("Auth.RoleGrantPermission"))
    }

    async fn role_revoke_permission(
        &self,
        _request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        Err(refuse("Auth.RoleRevokePermission"))
    }
}
